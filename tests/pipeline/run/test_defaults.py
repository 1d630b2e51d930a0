"""build-corpus defaults that fit where it runs: --device auto, one model actor per GPU, and
model actors that use the CPUs Ray granted them, not every core of the node.

No GPU here: the GPU cases fake torch.cuda (this machine) or ray.cluster_resources() (a cluster).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from pipeline.config import check_cluster_gpus
from pipeline.roi import detect
from workflows import build_corpus

ROOT = Path(__file__).resolve().parents[3]


def _config(*extra: str):
    argv = [str(ROOT), "--out", str(ROOT / "never-written"), "--roi", "labels,boxes",
            "--segmenter", "otsu", *extra]
    return build_corpus.config_from_args(build_corpus._parser().parse_args(argv))


@pytest.mark.parametrize("env, want", [(None, "ray"), ("", "ray"), ("local", "local")])
def test_executor_default_follows_the_environment(monkeypatch, env, want):
    """Unset or empty $REGIONCORPUS_EXECUTOR: Ray (an empty value once failed the build)."""
    if env is None:
        monkeypatch.delenv("REGIONCORPUS_EXECUTOR", raising=False)
    else:
        monkeypatch.setenv("REGIONCORPUS_EXECUTOR", env)
    assert _config().execution.executor == want


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_defaults_resolve_to_cpu_and_one_actor_here():
    assert not torch.cuda.is_available()
    cfg = _config()
    assert (cfg.regions.device, cfg.execution.model_actors) == ("cpu", 1)
    cfg.validate()


def test_four_local_gpus_give_cuda_and_four_actors(four_gpus):
    cfg = _config()
    assert (cfg.regions.device, cfg.execution.model_actors) == ("cuda", 4)


def test_half_a_gpu_per_actor_gives_two_actors_per_gpu(four_gpus):
    assert _config("--gpus-per-actor", "0.5").execution.model_actors == 8


def test_a_pinned_device_counts_one_gpu(four_gpus):
    assert _config("--device", "cuda:2").execution.model_actors == 1


@pytest.mark.parametrize("gpus, device, actors", [(8, "cuda", 8), (0, "cpu", 1)])
def test_a_cluster_resolves_device_and_actors_once_joined(gpus, device, actors):
    cfg = _config("--address", "ray://head:10001")
    assert (cfg.regions.device, cfg.execution.model_actors) == ("auto", 0)  # the cluster's call
    cfg.validate()
    resources = {"CPU": 256.0, "GPU": float(gpus)} if gpus else {"CPU": 256.0}
    resolved = check_cluster_gpus(cfg, resources)
    assert (resolved.regions.device, resolved.execution.model_actors) == (device, actors)


def test_explicit_model_actors_win(four_gpus):
    assert _config("--model-actors", "2").execution.model_actors == 2
    cluster = _config("--address", "auto", "--model-actors", "2")
    assert check_cluster_gpus(cluster, {"GPU": 8.0}).execution.model_actors == 2


def test_negative_model_actors_are_refused():
    with pytest.raises(ValueError, match="--model-actors -1"):
        _config("--model-actors", "-1").validate()


class _FakeContext:
    def __init__(self, task_id, assigned):
        self.task_id, self.assigned = task_id, assigned

    def get_task_id(self):
        return self.task_id

    def get_assigned_resources(self):
        return self.assigned


def _fake_ray(monkeypatch, task_id, assigned):
    ray = types.SimpleNamespace(is_initialized=lambda: True,
                                get_runtime_context=lambda: _FakeContext(task_id, assigned))
    monkeypatch.setitem(sys.modules, "ray", ray)


@pytest.mark.parametrize("assigned, threads", [({"CPU": 3.0}, 3), ({"CPU": 0.5}, 1), ({}, 1)])
def test_model_actor_threads_are_the_cpus_ray_granted(monkeypatch, assigned, threads):
    monkeypatch.setattr(detect.os, "cpu_count", lambda: 64)
    _fake_ray(monkeypatch, "a1b2", assigned)
    before = torch.get_num_threads()
    try:
        detect.restore_threads()
        assert torch.get_num_threads() == threads == detect.granted_cpus()
    finally:
        torch.set_num_threads(before)


def test_outside_ray_threads_are_the_cpu_count(monkeypatch):
    monkeypatch.setattr(detect.os, "cpu_count", lambda: 64)
    _fake_ray(monkeypatch, None, {"CPU": 3.0})  # the driver: not a task or actor
    assert detect.granted_cpus() == 64
    monkeypatch.delitem(sys.modules, "ray")
    assert detect.granted_cpus() == 64
