"""Fault test, for real: build-corpus killed with SIGKILL mid-run, several times, then rerun.

The final region_id set equals a clean run's, nothing is duplicated, and the manifest's counts
match the files on disk. No worker process outlives a killed run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

ARGS = ["--executor", "local", "--units-per-shard", "1", "--workers", "2"]

REPO = Path(__file__).resolve().parents[3]  # the checkout: `python -m workflows...` runs from here


def _cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "workflows.build_corpus", str(src), "--out", str(out), *ARGS]


def _committed(out: Path) -> int:
    return len(list((out / "_commits").glob("shard-*.json"))) if (out / "_commits").exists() else 0


def _kill_midway(src: Path, out: Path, after_commits: int) -> None:
    proc = subprocess.Popen(_cmd(src, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ}, cwd=REPO)
    deadline = time.monotonic() + 120
    while _committed(out) < after_commits and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _survivors(out, timeout_s=20) == [], "forked workers outlived the killed run"


def _survivors(out: Path, timeout_s: float) -> list[int]:
    """Live processes of a build into ``out`` (its forked workers share its command line)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for p in psutil.process_iter(["cmdline", "status"]):
            try:
                if str(out) in (p.info["cmdline"] or []) and p.info["status"] != "zombie":
                    alive.append(p.pid)
            except psutil.Error:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_killed_runs_resume_to_the_clean_result(tmp_path):
    from pipeline.phantoms.studies import make_phantoms

    src = tmp_path / "ph"
    make_phantoms(src, patients=6, seed=8)
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    subprocess.run(_cmd(src, clean), check=True, capture_output=True, cwd=REPO)
    for after in (1, 3, 4):  # kill -9 three times, each later in the run
        _kill_midway(src, faulty, after)
    assert _committed(faulty) < 6, "the kills came too late to test anything"
    subprocess.run(_cmd(src, faulty), check=True, capture_output=True, cwd=REPO)

    ids = lambda out: pq.read_table(out / "regions", columns=["region_id"])["region_id"].to_pylist()  # noqa: E731
    assert len(ids(faulty)) == len(set(ids(faulty)))
    assert sorted(ids(faulty)) == sorted(ids(clean))
    manifest = json.loads((faulty / "manifest.json").read_text())
    for table in ("files", "series", "images", "regions"):
        on_disk = pq.read_table(faulty / table).num_rows
        assert manifest["rows"][table] == on_disk, table
    assert manifest["complete"]
    assert not list(faulty.glob("*/.*.tmp-*"))  # no half-written file survives
