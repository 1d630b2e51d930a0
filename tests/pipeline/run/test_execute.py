"""The Ray executor: embedded Ray gives the same bytes as the local executor; a real two-node
cluster started with `ray start` builds through `ray job submit`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from workflows.build_corpus import main

RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from pipeline.phantoms.studies import make_phantoms

    root = tmp_path_factory.mktemp("exec")
    make_phantoms(root / "ph", patients=3, seed=4)
    return root / "ph"


def _tables(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes()
            for t in ("files", "series", "images", "regions") for p in sorted((out / t).glob("*"))}


@pytest.fixture(scope="module")
def local_build(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "corpus"
    assert main([str(phantoms), "--out", str(out), "--executor", "local",
                 "--units-per-shard", "1"]) == 0
    return out


def test_embedded_ray_gives_the_local_bytes(phantoms, local_build, tmp_path):
    out = tmp_path / "ray"
    assert main([str(phantoms), "--out", str(out), "--executor", "ray", "--workers", "2",
                 "--units-per-shard", "1"]) == 0
    assert _tables(out) == _tables(local_build)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["executor"] == "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args, timeout=120):
    ray = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray, *args], env=RAY_ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def ray_cluster():
    """A head and a worker node on this machine, one CPU each; stopped afterwards."""
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("ray CLI not installed")
    port, dash = _free_port(), _free_port()
    head = _ray("start", "--head", f"--port={port}", "--num-cpus=1", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}", "--disable-usage-stats")
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        worker = _ray("start", f"--address=127.0.0.1:{port}", "--num-cpus=1")
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield port, dash
    finally:
        _ray("stop", "--force")


def test_ray_job_submit_through_two_nodes(phantoms, local_build, tmp_path, ray_cluster):
    import time

    port, dash = ray_cluster
    for _ in range(30):  # the worker registers with the head a moment after `ray start`
        status = _ray("status", f"--address=127.0.0.1:{port}")
        if status.stdout.count("node_") >= 2:
            break
        time.sleep(1)
    assert status.stdout.count("node_") >= 2, status.stdout
    out = tmp_path / "cluster"
    env = json.dumps({"env_vars": {"REGIONCORPUS_KEY": os.environ["REGIONCORPUS_KEY"]}})
    build = str(Path(sys.executable).parent / "build-corpus")
    job = _ray("job", "submit", f"--address=http://127.0.0.1:{dash}", "--runtime-env-json", env,
               "--", build, str(phantoms), "--out", str(out), "--address", "auto",
               "--units-per-shard", "1", timeout=300)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    ids = lambda o: sorted(pq.read_table(o / "regions", columns=["region_id"])["region_id"].to_pylist())  # noqa: E731
    assert ids(out) == ids(local_build)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"]["regions"] == len(ids(out))
