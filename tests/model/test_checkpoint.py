"""Checkpoints: kept by count, verified by size and sha256 without a reload, written by a
background thread from a CPU copy (the caller's tensors may change at once)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from model.checkpoint import (
    CheckpointWriter,
    ckpt_path,
    load_checkpoint,
    save_checkpoint,
    verify_file,
)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_last_n(tmp_path, keep):
    for step in range(1, 6):
        save_checkpoint(tmp_path, {"step": step, "w": torch.full((4,), float(step))}, keep=keep)
    folder = ckpt_path(tmp_path).parent
    kept = sorted(p.name for p in folder.glob("step-*.pt"))
    assert kept == [f"step-{s:08d}.pt" for s in range(6 - keep, 5)]
    assert load_checkpoint(tmp_path)["step"] == 5
    for name in kept:  # every kept file verifies and holds its own step
        verify_file(folder / name)
        assert torch.load(folder / name, weights_only=False)["step"] == int(name[5:13])
    sums = json.loads((folder / "checksums.json").read_text())
    assert sorted(sums) == sorted(["last.pt", *kept])


def test_corruption_is_detected_without_a_reload(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"step": 1, "w": torch.arange(1000.0)})
    path = ckpt_path(tmp_path)

    def no_load(*a, **k):
        raise AssertionError("the save reloaded the checkpoint")

    monkeypatch.setattr(torch, "load", no_load)
    save_checkpoint(tmp_path, {"step": 2, "w": torch.arange(1000.0)})  # verifies without load
    monkeypatch.undo()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="sha256"):
        load_checkpoint(tmp_path)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(RuntimeError, match="size"):
        load_checkpoint(tmp_path)


def test_writer_saves_a_copy_in_the_background(tmp_path, monkeypatch):
    """submit returns while the file is still being written; later in-place changes to the
    model do not reach the checkpoint; a failed save is raised by the next call."""
    import model.checkpoint as ck

    gate, real = threading.Event(), ck.save_checkpoint

    def slow(run, state, keep=1):
        assert gate.wait(30)
        return real(run, state, keep)

    monkeypatch.setattr(ck, "save_checkpoint", slow)
    w = torch.zeros(3)
    writer = CheckpointWriter(tmp_path, keep=2)
    writer.submit({"step": 1, "w": w})
    assert not ckpt_path(tmp_path).exists()  # not written yet: the caller did not wait
    w.add_(5)  # the optimizer updates in place
    gate.set()
    writer.close()
    assert torch.equal(load_checkpoint(tmp_path)["w"], torch.zeros(3))

    def fail(run, state, keep=1):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_checkpoint", fail)
    writer.submit({"step": 2, "w": w})
    with pytest.raises(OSError):
        writer.close()
