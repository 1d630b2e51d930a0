"""Run work items in forked child processes under a timeout and an address-space cap.

A decoder that segfaults, hangs or allocates without bound takes down only its own child: the
parent turns that into an :class:`IngestError` (``decode_crash``, ``decode_timeout``,
``decode_memory``) for the item and goes on. At most ``workers`` children run at once. Each
child is forked (cheap, no re-import), inherits the item list, and serves items one at a time:
the parent sends an index down a pipe and reads the pickled result back. A child serves up to
``items_per_child`` items and is then replaced, so its warm heap and caches are reused (a fresh
fork per item spent ~20 % more time in page faults and first-use work) while a slow leak or
address-space creep cannot build up. A child that dies or overruns the timeout costs only the
item it was working on; the parent forks a fresh one for the rest.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import resource
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import wait

from .errors import IngestError

ITEMS_PER_CHILD = 16


def _vm_size_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _apply(fn, item) -> tuple[str, object]:
    try:
        return "ok", fn(item)
    except MemoryError:
        return "err", IngestError("decode_memory", "exceeded the memory cap")
    except IngestError as e:
        return "err", e
    except Exception as e:  # a bug or an unexpected library error: becomes a row
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return "err", IngestError("internal", tb[:500])


def _serve(fn, items, tasks, results, mem_bytes: int) -> None:
    """Child: apply ``fn`` to ``items[i]`` for each index ``i`` received, until None or EOF."""
    faulthandler.disable()  # a crash in a decoder is reported as a row, not a stack dump
    try:
        if mem_bytes > 0:
            limit = _vm_size_bytes() + mem_bytes  # the cap is on top of what fork inherited
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        while True:
            try:
                i = tasks.recv()
            except EOFError:
                break
            if i is None:
                break
            payload = _apply(fn, items[i])
            try:
                data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
            except MemoryError:
                payload = ("err", IngestError("decode_memory", "exceeded the memory cap"))
                data = pickle.dumps(payload)
            results.send_bytes(data)
            if _is_memory_error(payload):
                break  # the heap may be in a bad state: let the parent fork a fresh child
    finally:
        os._exit(0)


def _is_memory_error(payload) -> bool:
    return payload[0] == "err" and getattr(payload[1], "reason", None) == "decode_memory"


class _Child:
    """Parent-side handle of one serving child."""

    def __init__(self, fn, items, mem_bytes: int):
        ctx = mp.get_context("fork")
        task_recv, self.tasks = ctx.Pipe(duplex=False)
        self.results, result_send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_serve, args=(fn, items, task_recv, result_send, mem_bytes),
                                daemon=True)
        self.proc.start()
        task_recv.close()
        result_send.close()
        self.index, self.started, self.served = -1, 0.0, 0

    def submit(self, index: int) -> None:
        self.index, self.started = index, time.monotonic()
        try:
            self.tasks.send(index)
        except OSError:  # the child is gone: receive() reports the item as a crash
            pass

    def receive(self) -> tuple[str, object, bool]:
        """(status, value, still serving) for the item in flight."""
        try:
            payload = pickle.loads(self.results.recv_bytes())
        except (EOFError, OSError):
            self.proc.join(5)
            return "err", IngestError(
                "decode_crash", f"worker process died (exit code {self.proc.exitcode})"), False
        self.served += 1
        return payload[0], payload[1], not _is_memory_error(payload)

    def close(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.tasks.send(None)
            except OSError:
                kill = True
            self.proc.join(5)
        if kill or self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.tasks.close()
        self.results.close()


def run_isolated(fn: Callable, items: Iterable, workers: int, timeout_s: float,
                 mem_bytes: int, items_per_child: int = ITEMS_PER_CHILD
                 ) -> Iterator[tuple[int, str, object]]:
    """Apply ``fn`` to each item in forked children (see module doc).

    Yields (index, "ok" | "err", result or IngestError) as items finish (not in order).
    """
    items = list(items)
    pending = deque(range(len(items)))
    busy: dict[object, _Child] = {}
    idle: list[_Child] = []
    workers = max(1, workers)
    try:
        while pending or busy:
            while pending and len(busy) < workers:
                child = idle.pop() if idle else None
                if child is not None and not child.proc.is_alive():  # died while idle
                    child.close(kill=True)
                    child = None
                child = child or _Child(fn, items, mem_bytes)
                child.submit(pending.popleft())
                busy[child.results] = child
            for conn in wait(list(busy), timeout=0.2):
                child = busy.pop(conn)
                status, value, serving = child.receive()
                yield child.index, status, value
                if serving and child.served < items_per_child:
                    idle.append(child)
                else:
                    child.close(kill=not serving)
            now = time.monotonic()
            for conn, child in list(busy.items()):
                if now - child.started > timeout_s:
                    busy.pop(conn)
                    child.close(kill=True)
                    yield child.index, "err", IngestError(
                        "decode_timeout", f"exceeded the {timeout_s:.0f} s limit")
    finally:
        for child in [*idle, *busy.values()]:
            child.close(kill=child in busy.values())
