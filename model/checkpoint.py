"""Atomic checkpoints and loading a finished run.

``save_checkpoint`` writes ``RUN/ckpt/.last.pt.tmp-PID`` while hashing the bytes it writes,
fsyncs it, checks its size, records ``{size, sha256, step}`` in ``RUN/ckpt/checksums.json`` and
renames it over ``RUN/ckpt/last.pt``; a crash at any point leaves either the previous checkpoint
or the new one, never a partial file under the final name (a stale temporary from a killed
writer is removed by the next save). Verification is cheap: the size on save, the sha256 on
load (:func:`verify_file`, a read of the bytes; no deserialisation). With ``keep`` > 1 the
previous ``last.pt`` stays as ``step-XXXXXXXX.pt`` (a hard link, else a copy) and only the
newest ``keep`` checkpoints are kept. :class:`CheckpointWriter` does the writing on a
background thread from a CPU copy of the state, so the training step does not wait for disk.
The checkpoint holds: ``model`` (state dict), ``optimizer``, ``config`` (RunConfig dict),
``step`` (optimizer steps done), ``stage``, ``data`` (per rank: DataLoader rotation and the
per-reader :class:`model.data.DataState`), ``rng`` (python, numpy, torch CPU and CUDA states),
``vocab_size``.

A run folder holds one run: :func:`check_run_folder` refuses to train into an earlier run's
files unless it is resumed (``--resume``) or replaced (``--overwrite``, which
:func:`clear_run` carries out once the whole request is validated).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading
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


class _HashingFile:
    """A binary file that hashes (sha256) and counts what is written through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checksums(folder: Path) -> dict:
    path = folder / "checksums.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _keep_previous(folder: Path, sums: dict, keep: int) -> None:
    """Keep the current ``last.pt`` as ``step-XXXXXXXX.pt`` (hard link, else copy) and drop
    kept checkpoints beyond the newest ``keep - 1``."""
    last = folder / "last.pt"
    entry = (sums.get("last.pt") or [None])[0]
    if keep > 1 and last.exists() and entry is not None:
        name = f"step-{int(entry['step']):08d}.pt"
        (folder / name).unlink(missing_ok=True)
        try:
            os.link(last, folder / name)
        except OSError:  # no hard links on this file system
            shutil.copyfile(last, folder / name)
        sums[name] = entry
    kept = sorted(k for k in sums if k.startswith("step-"))
    for name in kept[: max(0, len(kept) - (keep - 1))]:
        (folder / name).unlink(missing_ok=True)
        sums.pop(name)


def save_checkpoint(run: Path, state: dict, keep: int = 1) -> Path:
    """Write ``state`` atomically to ``RUN/ckpt/last.pt``; check the written size and record
    its sha256 (see the module docstring); keep the newest ``keep`` checkpoints."""
    path = ckpt_path(run)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob(".last.pt.tmp-*"), *folder.glob(".checksums.json.tmp-*")]:
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".last.pt.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        hf = _HashingFile(f)
        torch.save(state, hf)
        f.flush()
        os.fsync(f.fileno())
    if tmp.stat().st_size != hf.size:
        tmp.unlink(missing_ok=True)
        raise RuntimeError("checkpoint did not verify: written size differs")
    entry = {"size": hf.size, "sha256": hf.sha.hexdigest(), "step": state.get("step")}
    sums = _checksums(folder)
    _keep_previous(folder, sums, keep)
    # both the new and the previous last.pt verify until the rename below is done
    sums["last.pt"] = [entry, *(sums.get("last.pt") or [])[:1]]
    _write_json(folder / "checksums.json", sums)
    os.replace(tmp, path)
    sums["last.pt"] = [entry]
    _write_json(folder / "checksums.json", sums)
    _fsync_dir(folder)
    return path


def verify_file(path: Path) -> None:
    """RuntimeError unless ``path`` has the size and sha256 ``checksums.json`` records for it
    (files written before checksums existed pass)."""
    path = Path(path)
    entries = _checksums(path.parent).get(path.name)
    if not entries:
        return
    entries = entries if isinstance(entries, list) else [entries]
    size = path.stat().st_size
    if not any(e["size"] == size for e in entries):
        raise RuntimeError("checkpoint does not match its recorded size")
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    if not any(e["sha256"] == sha.hexdigest() for e in entries):
        raise RuntimeError("checkpoint does not match its recorded sha256")


def cpu_copy(obj):
    """A deep copy of ``obj`` with every tensor cloned to CPU (what a background save writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Saves checkpoints on one background thread: :meth:`submit` takes a CPU copy of the state
    (the only part the step waits for) and returns; at most one save is in flight (a second
    submit waits for the first). A failed save is raised by the next :meth:`submit` or by
    :meth:`close`."""

    def __init__(self, run: Path, keep: int = 1):
        self.run, self.keep = Path(run), keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _save(self, state: dict) -> None:
        try:
            save_checkpoint(self.run, state, self.keep)
        except BaseException as e:  # re-raised in the training thread
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, state: dict) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._save, args=(cpu_copy(state),),
                                        name="checkpoint-writer", daemon=False)
        self._thread.start()

    def close(self) -> None:
        self.wait()


def load_checkpoint(run: Path) -> dict:
    """The run's last checkpoint, after checking its size and sha256 (:func:`verify_file`)."""
    verify_file(ckpt_path(run))
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
