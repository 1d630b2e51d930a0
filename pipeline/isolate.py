"""Run work items in forked child processes under a timeout and an address-space cap.

A decoder that segfaults, hangs or allocates without bound takes down only its own child: the
parent turns that into an :class:`IngestError` (``decode_crash``, ``decode_timeout``,
``decode_memory``) for the item and goes on. Children are forked (cheap, no re-import) and run
one item each; at most ``workers`` run at once. Results come back pickled through a pipe.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import resource
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import wait

from .errors import IngestError


def _vm_size_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _child(fn, item, conn, mem_bytes: int) -> None:
    faulthandler.disable()  # a crash in a decoder is reported as a row, not a stack dump
    try:
        if mem_bytes > 0:
            limit = _vm_size_bytes() + mem_bytes  # the cap is on top of what fork inherited
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            payload = ("ok", fn(item))
        except MemoryError:
            payload = ("err", IngestError("decode_memory", "exceeded the memory cap"))
        except IngestError as e:
            payload = ("err", e)
        except Exception as e:  # a bug or an unexpected library error: becomes a row
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            payload = ("err", IngestError("internal", tb[:500]))
        data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        conn.send_bytes(data)
    except MemoryError:
        conn.send_bytes(pickle.dumps(("err", IngestError("decode_memory", "exceeded the memory cap"))))
    finally:
        conn.close()
        os._exit(0)


class _Job:
    def __init__(self, index, item, fn, mem_bytes):
        ctx = mp.get_context("fork")
        self.index = index
        self.recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_child, args=(fn, item, send, mem_bytes), daemon=True)
        self.proc.start()
        send.close()
        self.started = time.monotonic()

    def finish(self):
        try:
            status, value = pickle.loads(self.recv.recv_bytes())
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            status, value = "err", IngestError(
                "decode_crash", f"worker process died (exit code {code})")
        self.recv.close()
        self.proc.join(5)
        return status, value

    def kill(self):
        self.proc.kill()
        self.proc.join(5)
        self.recv.close()


def run_isolated(fn: Callable, items: Iterable, workers: int, timeout_s: float,
                 mem_bytes: int) -> Iterator[tuple[int, str, object]]:
    """Apply ``fn`` to each item in its own forked child.

    Yields (index, "ok" | "err", result or IngestError) as items finish (not in order).
    """
    pending = list(enumerate(items))[::-1]
    running: dict[object, _Job] = {}
    workers = max(1, workers)
    while pending or running:
        while pending and len(running) < workers:
            i, item = pending.pop()
            job = _Job(i, item, fn, mem_bytes)
            running[job.recv] = job
        ready = wait(list(running), timeout=0.2)
        for conn in ready:
            job = running.pop(conn)
            status, value = job.finish()
            yield job.index, status, value
        now = time.monotonic()
        for conn, job in list(running.items()):
            if now - job.started > timeout_s:
                running.pop(conn)
                job.kill()
                yield job.index, "err", IngestError(
                    "decode_timeout", f"exceeded the {timeout_s:.0f} s limit")
