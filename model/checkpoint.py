"""Atomic checkpoints and loading a finished run.

``save_checkpoint`` writes ``RUN/ckpt/.last.pt.tmp-PID``, fsyncs it, renames it over
``RUN/ckpt/last.pt`` and verifies the result by loading it back; a crash at any point leaves
either the previous checkpoint or the new one, never a partial file under the final name (a
stale temporary from a killed writer is removed by the next save).
The checkpoint holds: ``model`` (state dict), ``optimizer``, ``config`` (RunConfig dict),
``step`` (optimizer steps done), ``stage``, ``data`` (per rank: DataLoader rotation and the
per-reader :class:`model.data.DataState`), ``rng`` (python, numpy, torch CPU and CUDA states),
``vocab_size``.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from model.clip import RegionCLIP, build_model
from model.config import RunConfig
from model.data import DataState
from model.text_tower import load_tokenizer


def ckpt_path(run: Path) -> Path:
    return Path(run) / "ckpt" / "last.pt"


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
