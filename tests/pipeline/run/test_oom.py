"""A worker killed by the system (SIGKILL, as the kernel's OOM killer sends; another signal; its
address space exhausted) is not a verdict on its item: the item is retried once, alone, in a
fresh child; only a second failure gives it an error (``out_of_memory`` for a kill or memory,
``decode_crash`` for another signal). The item's own failures are verdicts at once."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import IngestError
from pipeline.run.isolate import run_isolated

CAP = 256 << 20


def _event(log_dir: Path, text: str) -> None:
    with open(log_dir / "events", "a") as f:  # O_APPEND: one line per write, in order
        f.write(text + "\n")


def _events(log_dir: Path) -> list[str]:
    return (log_dir / "events").read_text().split("\n")[:-1]


def _attempt(log_dir: Path, item: str) -> int:
    """Record one attempt at ``item``; returns how many there were, this one included."""
    _event(log_dir, f"start {item}")
    with open(log_dir / f"{item}.attempts", "a") as f:
        f.write(f"{os.getpid()}\n")
    return len((log_dir / f"{item}.attempts").read_text().split())


def _attempts(log_dir: Path, item: str) -> int:
    path = log_dir / f"{item}.attempts"
    return len(path.read_text().split()) if path.exists() else 0


def _fail(how: str) -> None:
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "sigsegv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if how == "sigbus":
        os.kill(os.getpid(), signal.SIGBUS)
    if how == "memory":
        bytearray(2 << 30)  # over the cap: MemoryError
    if how == "raise":
        raise ValueError("a bug in the item's own code")
    if how == "ingest":
        raise IngestError("decode_failed", "the decoder refused the pixels")
    if how == "exit":
        os._exit(3)


def _worker(log_dir: Path, busy_s: float, before: frozenset = frozenset()):
    """Items are "NAME:HOW:WHEN" (HOW: a failure of :func:`_fail` or "none", which works for
    ``busy_s``; WHEN: "once" or "always"). Returns (name, live siblings of this child when it
    ran a second attempt; ``before``: the test process's children before the isolator started,
    not its siblings)."""
    def work(item: str):
        name, how, when = item.split(":")
        n = _attempt(log_dir, name)
        if how != "none" and (when == "always" or n == 1):
            _fail(how)
        if how == "none":
            time.sleep(busy_s)  # in flight when a sibling dies
        siblings = None
        if n > 1:  # a retry: while it runs, no other child of the isolator exists
            time.sleep(0.25)  # (room for a sibling to be forked, were the retry not alone)
            parent = psutil.Process(os.getppid())
            siblings = sorted(p.pid for p in parent.children()
                              if p.pid != os.getpid() and p.pid not in before
                              and p.status() != psutil.STATUS_ZOMBIE)
        _event(log_dir, f"end {name}")
        return name, siblings
    return work


def _run(items: list[str], log_dir: Path, workers: int = 3, per_child: int = 16,
         busy_s: float = 0.2) -> dict:
    before = frozenset(p.pid for p in psutil.Process().children())  # other tests' leftovers
    out = list(run_isolated(_worker(log_dir, busy_s, before), items, workers, 30.0, CAP,
                            per_child))
    assert sorted(i for i, _, _ in out) == list(range(len(items)))  # each exactly once
    return {items[i].split(":")[0]: (s, v) for i, s, v in out}


NORMAL = [f"n{i}:none:once" for i in range(6)]


@pytest.mark.parametrize("how", ["sigkill", "sigsegv", "sigbus", "memory"])
def test_a_system_failure_once_is_retried_alone_and_ends_ok(tmp_path, how):
    items = [f"victim:{how}:once", *NORMAL]  # dies while two others are in flight
    res = _run(items, tmp_path)
    assert res["victim"] == ("ok", ("victim", []))  # no quarantine; ran with no sibling alive
    assert _attempts(tmp_path, "victim") == 2
    events = _events(tmp_path)
    retry = [i for i, e in enumerate(events) if e == "start victim"][1]
    assert events[retry + 1] == "end victim"  # nothing started or ended while it ran
    started = {e.split()[1] for e in events[:retry] if e.startswith("start ")} - {"victim"}
    ended = {e.split()[1] for e in events[:retry] if e.startswith("end ")}
    assert started == ended  # the others in flight had finished before it began
    for item in NORMAL:
        name = item.split(":")[0]
        assert res[name] == ("ok", (name, None)) and _attempts(tmp_path, name) == 1


@pytest.mark.parametrize("how, reason", [("sigkill", "out_of_memory"),
                                         ("memory", "out_of_memory"),
                                         ("sigsegv", "decode_crash"),
                                         ("sigbus", "decode_crash")])
def test_a_system_failure_twice_gets_its_verdict(tmp_path, how, reason):
    items = NORMAL[:2] + [f"victim:{how}:always"] + NORMAL[2:]
    res = _run(items, tmp_path)
    status, err = res["victim"]
    assert status == "err" and err.reason == reason
    assert _attempts(tmp_path, "victim") == 2
    assert all(res[i.split(":")[0]][0] == "ok" for i in NORMAL)


@pytest.mark.parametrize("how, reason", [("raise", "internal"), ("ingest", "decode_failed"),
                                         ("exit", "decode_crash")])
def test_the_items_own_failure_is_a_verdict_at_once(tmp_path, how, reason):
    items = NORMAL[:2] + [f"victim:{how}:always"] + NORMAL[2:]
    res = _run(items, tmp_path)
    status, err = res["victim"]
    assert status == "err" and err.reason == reason
    assert _attempts(tmp_path, "victim") == 1  # not retried as if the machine had failed it


HOWS = ["none", "sigkill", "sigsegv", "memory", "raise", "exit"]


def _expected(how: str, when: str) -> tuple[str | None, int]:
    """(reason or None for ok, attempts) for an item that fails HOW, WHEN."""
    if how == "none":
        return None, 1
    if how in ("raise", "exit"):
        return {"raise": "internal", "exit": "decode_crash"}[how], 1
    if when == "once":
        return None, 2
    return ("out_of_memory" if how in ("sigkill", "memory") else "decode_crash"), 2


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(st.tuples(st.sampled_from(HOWS), st.sampled_from(["once", "always"])),
                     min_size=1, max_size=8),
       workers=st.integers(1, 3), per_child=st.integers(1, 4))
def test_any_schedule_of_failures_gets_each_item_its_verdict(plan, workers, per_child):
    """Whatever mix of failures, worker count and child recycling: each item is yielded once,
    with the verdict its failure deserves, after the attempts it deserves; retries run alone."""
    with tempfile.TemporaryDirectory() as d:
        log_dir = Path(d)
        items = [f"i{k}:{how}:{when}" for k, (how, when) in enumerate(plan)]
        res = _run(items, log_dir, workers, per_child, busy_s=0.0)
        for k, (how, when) in enumerate(plan):
            reason, attempts = _expected(how, when)
            status, value = res[f"i{k}"]
            assert _attempts(log_dir, f"i{k}") == attempts
            if reason is None:
                assert status == "ok" and value[0] == f"i{k}"
                assert value[1] == ([] if attempts == 2 else None)
            else:
                assert status == "err" and value.reason == reason


# --- end to end: the local executor --------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from pipeline.phantoms.studies import make_phantoms

    root = tmp_path_factory.mktemp("oom")
    make_phantoms(root / "ph", patients=2, seed=5, matrix=64)
    return root / "ph"


def _kill_one_unit(monkeypatch, tmp_path: Path, always: bool) -> Path:
    """process_unit SIGKILLs its own worker for the first unit it meets (once, or always);
    returns the marker file naming that unit."""
    from pipeline.run import execute

    real = execute.process_unit
    marker = tmp_path / "victim"

    def flaky(task, cfg, deid):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            victim = marker.read_text()
        else:
            os.write(fd, task.unit_key.encode())
            os.close(fd)
            victim = task.unit_key
            os.kill(os.getpid(), signal.SIGKILL)  # mid-unit, as the OOM killer would
        if task.unit_key == victim:
            with open(tmp_path / "retries", "a") as f:
                f.write("1\n")
            if always:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(task, cfg=cfg, deid=deid)

    monkeypatch.setattr(execute, "process_unit", flaky)
    return marker


def _build(src: Path, out: Path) -> int:
    from workflows.build_corpus import main

    return main([str(src), "--out", str(out), "--executor", "local", "--units-per-shard", "1",
                 "--workers", "2"])


def test_a_unit_killed_once_mid_unit_completes_with_nothing_quarantined(phantoms, tmp_path,
                                                                        monkeypatch):
    marker = _kill_one_unit(monkeypatch, tmp_path, always=False)
    out = tmp_path / "corpus"
    assert _build(phantoms, out) == 0
    victim = marker.read_text()
    assert (tmp_path / "retries").read_text() == "1\n"  # killed once, then rerun once
    files = pq.read_table(out / "files").to_pylist()
    mine = [r for r in files if r["unit_key"] == victim]
    assert any(r["status"] == "ingested" for r in mine)
    assert all(r["status"] != "quarantined" for r in mine)
    assert not [r for r in files if r["status"] == "quarantined"]
    series = pq.read_table(out / "series").to_pylist()
    assert victim in {r["unit_key"] for r in series}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["quarantined"] == 0


def test_a_unit_killed_every_time_is_out_of_memory_not_decode_crash(phantoms, tmp_path,
                                                                     monkeypatch):
    marker = _kill_one_unit(monkeypatch, tmp_path, always=True)
    out = tmp_path / "corpus"
    _build(phantoms, out)  # its exit code is build.py's (a unit left for a rerun)
    victim = marker.read_text()
    files = pq.read_table(out / "files").to_pylist()
    mine = [r for r in files if r["unit_key"] == victim]
    assert mine and {(r["status"], r["reason"]) for r in mine} == {("quarantined",
                                                                     "out_of_memory")}
    others = [r for r in files if r["unit_key"] and r["unit_key"] != victim]
    assert others and all(r["status"] != "quarantined" for r in others)
