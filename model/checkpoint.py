"""Atomic checkpoints and loading a finished run.

``save_checkpoint`` writes ``RUN/ckpt/.last.pt.tmp-PID``, fsyncs it, renames it over
``RUN/ckpt/last.pt`` and verifies the result by loading it back; a crash at any point leaves
either the previous checkpoint or the new one, never a partial file under the final name (a
stale temporary from a killed writer is removed by the next save).
The checkpoint holds: ``model`` (state dict), ``optimizer``, ``config`` (RunConfig dict),
``step`` (optimizer steps done), ``stage``, ``data`` (per rank: DataLoader rotation and the
per-reader :class:`model.data.DataState`), ``rng`` (python, numpy, torch CPU and CUDA states),
``vocab_size``.

A run folder holds one run: :func:`check_run_folder` refuses to train into an earlier run's
files unless it is resumed (``--resume``) or replaced (``--overwrite``, which
:func:`clear_run` carries out once the whole request is validated).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from model.clip import RegionCLIP, build_model
from model.config import RunConfig
from model.data import DataState
from model.text_tower import load_tokenizer

#: What a training run writes in its folder (besides Ray Train's own state, RAY_STATE).
RUN_FILES = ("ckpt", "log.jsonl", "config.json", "tokenizer", "tb", "loss_curves.png")
RAY_STATE = "ray_train"  # Ray Train's run state (train-model --address), replaced by --overwrite


def ckpt_path(run: Path) -> Path:
    return Path(run) / "ckpt" / "last.pt"


def run_files(run: Path) -> list[Path]:
    """The files and folders of an earlier training run present in ``run`` (see RUN_FILES)."""
    return [Path(run) / name for name in RUN_FILES if (Path(run) / name).exists()]


def check_run_folder(run: Path, resume: bool, overwrite: bool) -> None:
    """ValueError naming the flag unless training may write into ``run``: a folder (or a path
    to create) that holds no earlier run, or one whose run is continued (``resume``) or
    replaced (``overwrite``). Nothing is deleted here (see :func:`clear_run`)."""
    run = Path(run)
    if resume and overwrite:
        raise ValueError("--resume/--overwrite: choose one (continue the run in --out, or "
                         "start it over)")
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out {run}: exists and is not a folder")
    if not (resume or overwrite) and run_files(run):
        raise ValueError(f"--out {run}: holds a training run (checkpoint or log); pass "
                         "--resume to continue it or --overwrite to delete it and start over")


def clear_run(run: Path) -> None:
    """Delete an earlier run's files from ``run`` (RUN_FILES and RAY_STATE); anything else in
    the folder is left alone. Called for ``--overwrite`` once the request is validated."""
    for path in [*run_files(run), Path(run) / RAY_STATE]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(run: Path, state: dict) -> Path:
    """Write ``state`` atomically to ``RUN/ckpt/last.pt`` and verify it loads."""
    path = ckpt_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(".last.pt.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".last.pt.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    check = torch.load(path, map_location="cpu", weights_only=False)
    if check.get("step") != state.get("step"):
        raise RuntimeError(f"checkpoint {path} did not verify")
    return path


def load_checkpoint(run: Path) -> dict:
    return torch.load(ckpt_path(run), map_location="cpu", weights_only=False)


def data_states(ckpt: dict, rank: int) -> tuple[dict[int, DataState], int]:
    d = ckpt.get("data", {}).get(rank) or ckpt.get("data", {}).get(str(rank)) or {}
    states = {int(g): DataState(**s) for g, s in d.get("readers", {}).items()}
    return states, int(d.get("rotate", 0))


def pack_data_state(states: dict[int, DataState], rotate: int) -> dict:
    return {"readers": {g: asdict(s) for g, s in states.items()}, "rotate": rotate}


def load_run(run: Path, device: str | torch.device = "cpu") -> tuple[RegionCLIP, object, RunConfig]:
    """(model in eval mode, tokenizer, config) of a training run folder."""
    ck = load_checkpoint(run)
    cfg = RunConfig.from_dict(ck["config"])
    tok = load_tokenizer(Path(run) / "tokenizer")
    model = build_model(cfg, ck["vocab_size"])
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), tok, cfg
