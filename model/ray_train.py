"""Ray Train launcher: the same :func:`model.train.train` loop on N Ray workers (``--address``).

Ray Train's ``TorchTrainer`` starts ``workers`` processes on the cluster (``resources`` CPUs and,
for ``cuda`` devices, one GPU each), initialises the torch process group (gloo on CPU, NCCL on
GPU) and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as torchrun does, so the loop, its shard
dealing per rank and its feature gathering across ranks are unchanged. Checkpoints stay the
run's own (``RUN/ckpt/last.pt``, written by rank 0): on a multi-node cluster ``RUN`` must be on
storage every node sees. When a worker dies, Ray restarts the whole group (up to
``max_failures`` times) and the loop resumes from the last checkpoint this launch wrote.
Before anything is launched or deleted, :func:`check_cluster_gpus` compares the GPUs the ranks
ask for with the cluster's (Ray would otherwise wait for them forever).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import torch

from model.checkpoint import RUN_FILES, ckpt_path, clear_run
from model.train import TrainOptions, train


@dataclass(frozen=True)
class RayOptions:
    address: str  # "auto", "ray://head:10001", "HOST:PORT", or "local" (a fresh embedded Ray)
    workers: int = 1  # training processes (ranks)
    cpus_per_worker: float = 1.0
    max_failures: int = 1  # whole-group restarts after a worker failure


class ClusterRequestError(ValueError):
    """The cluster cannot meet the request (too few GPUs); nothing was launched."""


def check_cluster_gpus(ray_opts: RayOptions, device: str, resources: dict) -> None:
    """:class:`ClusterRequestError` naming the flags when ``--ray-workers`` ranks on a cuda
    ``device`` need more GPUs (one each) than ``resources`` (``ray.cluster_resources()``) has."""
    have = float(resources.get("GPU", 0) or 0)
    if device.startswith("cuda") and ray_opts.workers > have:
        raise ClusterRequestError(
            f"--ray-workers {ray_opts.workers} --device {device}: needs {ray_opts.workers} "
            f"GPUs (one per rank); the cluster at --address {ray_opts.address} has {have:g}")


def _loop(config: dict) -> None:
    """Per-worker entry point: resume when this launch already wrote run files (a restart of
    the worker group; from its checkpoint when there is one)."""
    opts: TrainOptions = config["opts"]
    torch.set_num_threads(max(1, int(config["threads"])))
    written = [opts.out / name for name in RUN_FILES if (opts.out / name).exists()]
    restarted = any(p.stat().st_mtime >= config["launched"] for p in written)
    train(replace(opts, resume=opts.resume or restarted))


def train_on_ray(opts: TrainOptions, ray_opts: RayOptions) -> dict:
    """Run :func:`model.train.train` on ``ray_opts.workers`` Ray Train workers; the same summary
    dict as ``train``. Starts (and stops) an embedded Ray for ``address="local"``. Checks the
    cluster's GPUs (:func:`check_cluster_gpus`), then, for ``opts.overwrite``, deletes the
    earlier run (here, once; the workers never delete)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = not ray.is_initialized()
    # set before torch loads OpenMP in the workers (see workflows/train_model.py)
    env = {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}
    if started and ray_opts.address == "local":
        ray.init(address="local", num_cpus=max(1, round(ray_opts.workers
                                                        * ray_opts.cpus_per_worker)),
                 include_dashboard=False, log_to_driver=True, runtime_env=env)
    elif started:
        ray.init(address=ray_opts.address, runtime_env=env)
    try:
        check_cluster_gpus(ray_opts, opts.device, ray.cluster_resources())
        out = opts.out.resolve()
        if opts.overwrite:
            clear_run(out)
            opts = replace(opts, overwrite=False)
        out.mkdir(parents=True, exist_ok=True)
        gpu = opts.device.startswith("cuda")
        trainer = TorchTrainer(
            _loop,
            train_loop_config={"opts": replace(opts, out=out, corpus=opts.corpus.resolve()),
                               "launched": time.time(),
                               "threads": ray_opts.cpus_per_worker},
            torch_config=TorchConfig(timeout_s=int(opts.dist_timeout_s)),  # every collective
            scaling_config=ScalingConfig(num_workers=ray_opts.workers, use_gpu=gpu,
                                         resources_per_worker={"CPU": ray_opts.cpus_per_worker}),
            run_config=RunConfig(name="ray_train", storage_path=str(out),
                                 failure_config=FailureConfig(max_failures=ray_opts.max_failures)),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    return {"run": str(opts.out), "checkpoint": str(ckpt_path(opts.out)),
            "launcher": "ray", "workers": ray_opts.workers}
