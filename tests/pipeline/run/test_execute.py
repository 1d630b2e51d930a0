"""The Ray executor: embedded Ray gives the same bytes as the local executor; a real two-node
cluster started with `ray start` builds through `ray job submit`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

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


MODEL_ARGS = ["--roi", "labels,boxes", "--segmenter", "otsu", "--device", "cpu",
              "--units-per-shard", "2", "--encoder-batch", "4"]


def test_model_stage_gives_the_same_bytes_on_ray_and_local(phantoms, tmp_path):
    """The boxes route through the model stage: CPU actors prepare and finish, a model actor
    segments whole shards; the local executor runs the same three steps in-process."""
    local, ray = tmp_path / "local", tmp_path / "ray"
    assert main([str(phantoms), "--out", str(local), "--executor", "local", *MODEL_ARGS]) == 0
    assert main([str(phantoms), "--out", str(ray), "--executor", "ray", "--workers", "2",
                 *MODEL_ARGS]) == 0
    assert _tables(ray) == _tables(local)
    regions = pq.read_table(local / "regions", columns=["source", "segmenter"]).to_pylist()
    assert {"source": "boxes", "segmenter": "otsu"} in regions


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


CANARY = b"CANARYUID"


@pytest.fixture
def canary_series(tmp_path):
    """One phantom series whose FrameOfReferenceUID is not a UID: pydicom warns, quoting it."""
    import pydicom

    from pipeline.phantoms.studies import make_phantoms

    make_phantoms(tmp_path / "src", patients=1, seed=6, matrix=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns here too, where it does not matter
        for f in (tmp_path / "src").rglob("*.dcm"):
            ds = pydicom.dcmread(f)
            ds.FrameOfReferenceUID = "1.2." + CANARY.decode()
            ds.save_as(f)
    return tmp_path / "src"


def test_ray_workers_keep_library_warnings_out_of_every_log(canary_series, tmp_path,
                                                            monkeypatch, capfd):
    """Under Ray, pydicom's warnings (which quote header values) reach no Ray log and no
    output; the CPU actors reserve their unit workers' memory cap."""
    import ray

    from pipeline.run import execute

    sessions, maps = [], []
    real_init, real_map = execute._ray_init, ray.data.Dataset.map

    def init(cfg):
        started = real_init(cfg)
        sessions.append(Path(ray._private.worker._global_node.get_session_dir_path()))
        return started

    def map_(self, fn, *args, **kwargs):
        maps.append((fn, kwargs.get("memory")))
        return real_map(self, fn, *args, **kwargs)

    monkeypatch.setattr(execute, "_ray_init", init)
    monkeypatch.setattr(ray.data.Dataset, "map", map_)
    out = tmp_path / "corpus"
    assert main([str(canary_series), "--out", str(out), "--executor", "ray", "--workers", "1",
                 "--unit-memory-mb", "1024"]) == 0
    assert maps == [(execute._CpuShard, 1024 << 20)]
    assert pq.read_table(out / "files").num_rows > 0
    captured = capfd.readouterr()
    assert CANARY.decode() not in captured.out + captured.err
    [session] = sessions
    logs = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name.startswith("worker-") for p in logs)  # the actors' logs were looked at
    leaked = [p.name for p in logs if CANARY in p.read_bytes()]
    assert leaked == []


@settings(max_examples=200, deadline=None)
@given(nodes=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 256)), min_size=1,
                      max_size=4),
       cap_mb=st.integers(256, 16384), models=st.booleans(), model_actors=st.integers(1, 2),
       shards=st.integers(1, 200))
def test_ray_pool_plan_keeps_each_nodes_reservations_within_its_memory(
        nodes, cap_mb, models, model_actors, shards):
    """Placing the model actors and then the CPU pool on the nodes (by CPU and by the memory
    each reserves) never overfills a node's memory: the pool is what the nodes hold."""
    from pipeline.config import BuildConfig, ExecConfig
    from pipeline.roi.regions import RegionConfig
    from pipeline.run.execute import CPU_ACTOR_CHILDREN, ray_pool_plan

    cfg = BuildConfig(sources=(), out=Path("unused"),
                      regions=RegionConfig(routes=("boxes",) if models else ("labels",)),
                      execution=ExecConfig(unit_memory_mb=cap_mb, model_actors=model_actors))
    res = [{"CPU": float(c), "memory": float(g << 30)} for c, g in nodes]
    actors, cpu_mem, model_mem = ray_pool_plan(res, cfg, shards)
    largest = max(r["memory"] for r in res)
    assert cpu_mem + model_mem <= largest  # one of each fits the largest node
    if cpu_mem + model_mem < largest * 0.999:  # not shrunk: the cap itself, × the children
        assert cpu_mem == (cap_mb << 20) * CPU_ACTOR_CHILDREN
    assert 1 <= actors <= shards
    free = [[r["CPU"], r["memory"]] for r in res]
    for kind, mem, count in (("model", model_mem, model_actors if models else 0),
                             ("cpu", cpu_mem, actors)):
        for _ in range(count):
            node = next((f for f in free if f[0] >= 1 and f[1] >= mem), None)
            # more model actors than the nodes hold is refused before any work (not the plan's)
            assume(node is not None or kind == "cpu")
            if node is None:  # only the forced minimum of one CPU actor may not be placed
                assert actors == 1
                return
            node[0], node[1] = node[0] - 1, node[1] - mem


def test_run_ray_refuses_a_gpu_request_the_cluster_cannot_meet(tmp_path, monkeypatch):
    """Joined to a cluster without GPUs, a cuda model stage is refused before any work is
    handed to Ray Data (which would wait forever for the GPU)."""
    import ray

    from pipeline.config import BuildConfig, ExecConfig, RequestError
    from pipeline.ingest.deid import Deidentifier
    from pipeline.roi.regions import RegionConfig
    from pipeline.run import execute

    cfg = BuildConfig(sources=(tmp_path,), out=tmp_path / "out",
                      regions=RegionConfig(routes=("labels", "boxes"), device="cuda"),
                      execution=ExecConfig(executor="ray", address="auto"))
    monkeypatch.setattr(execute, "_ray_init", lambda cfg: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})

    def no_work(*a, **k):
        raise AssertionError("work reached Ray Data before the GPU check")

    monkeypatch.setattr(ray.data, "from_items", no_work)
    with pytest.raises(RequestError, match="--device"):
        execute.run_ray([], cfg, Deidentifier(b"k" * 32), lambda m: None)
