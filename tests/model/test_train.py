"""Training on a 4-patient phantom corpus: the loss falls, a killed run resumes with the same
losses, checkpoints are atomic, a rerun into a run needs --resume or --overwrite, the CLI
rejects bad flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import ckpt_path, load_checkpoint, save_checkpoint
from model.train import TrainOptions, train
from model.trainlog import read_log
from workflows.train_model import main as train_main


def _opts(corpus, micro, out, **kw) -> TrainOptions:
    return TrainOptions(corpus=corpus, out=out, preset=str(micro), **kw)


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(run / "log.jsonl")]


def test_loss_falls(tiny_corpus, micro_preset, tmp_path):
    """Joint stage-3 training for 24 steps: the mean of the last 4 losses < the first 4."""
    opts = _opts(tiny_corpus, micro_preset, tmp_path / "run", steps=24, ckpt_every=100)
    train(opts)
    rows = read_log(tmp_path / "run" / "log.jsonl")
    region = [r["region_loss"] + r["negative_loss"] for r in rows if r["stage"] >= 2]
    assert len(region) >= 12
    assert sum(region[-4:]) / 4 < sum(region[:4]) / 4 - 0.1
    assert all(r["data_s"] >= 0 and r["step_s"] > 0 for r in rows)  # loader wait vs compute
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 1000
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()
    # the evaluation report has the promised structure
    from workflows.evaluate_model import main as eval_main

    out = tmp_path / "eval.json"
    assert eval_main(["--corpus", str(tiny_corpus), "--run", str(tmp_path / "run"),
                      "--out", str(out)]) == 0
    rep = json.loads(out.read_text())["region_aware"]
    for task in ("region_zero_shot", "image_zero_shot", "laterality_zero_shot"):
        assert set(rep[task]) >= {"accuracy", "balanced_accuracy", "auc"}
    for d in ("image_to_report", "report_to_image", "region_to_caption", "caption_to_region"):
        assert set(rep["retrieval"][d]) >= {"r1", "r5", "r10"}
    assert out.with_suffix(".md").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_with_same_losses(tiny_corpus, micro_preset, tmp_path, workers):
    """8 steps straight vs. killed after step 6 (checkpoint at 4) + --resume → same losses."""
    straight = tmp_path / "straight"
    train(_opts(tiny_corpus, micro_preset, straight, steps=8, workers=workers))
    killed = tmp_path / "killed"
    train(_opts(tiny_corpus, micro_preset, killed, steps=8, workers=workers, stop_after=6))
    assert load_checkpoint(killed)["step"] == 4  # rows 5, 6 were logged after it
    train(_opts(tiny_corpus, micro_preset, killed, steps=8, workers=workers, resume=True))
    a, b = _losses(straight), _losses(killed)
    assert [s for s, _ in b] == list(range(1, 9))
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, la), (_, lb) in zip(a, b, strict=True):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    ck = load_checkpoint(killed)
    assert ck["step"] == 8 and ck["stage"] == 3 and ck["data"][0]["readers"]


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(run, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def crash(obj, f, *a, **k):  # writes part of the file, then dies
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(run, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(run)["step"] == 1  # the previous checkpoint is intact
    save_checkpoint(run, {"step": 3, "w": torch.zeros(3)})
    assert load_checkpoint(run)["step"] == 3
    leftovers = [p.name for p in ckpt_path(run).parent.iterdir() if p.name != "last.pt"]
    assert leftovers == ["checksums.json"]


def test_cli_rejects_bad_flags(tiny_corpus, tmp_path, capsys):
    assert train_main(["--corpus", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "--corpus" in capsys.readouterr().err
    args = ["--corpus", str(tiny_corpus), "--out", str(tmp_path / "r")]
    assert train_main(args + ["--preset", "nope"]) == 2
    assert "--preset" in capsys.readouterr().err
    assert train_main(args + ["--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert train_main(args + ["--address", "local", "--ray-workers", "0"]) == 2
    assert "--ray-workers" in capsys.readouterr().err
    assert not (tmp_path / "r" / "ckpt").exists()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_rerun_is_refused_unless_resume_or_overwrite(tiny_corpus, micro_preset, tmp_path, capsys):
    """A finished run: rerunning into it is refused (files byte-identical); --resume continues
    it (nothing left to do: the log and checkpoint stay); --overwrite starts over, deleting
    the run's own files and nothing else in the folder."""
    run = tmp_path / "run"
    args = ["--corpus", str(tiny_corpus), "--out", str(run), "--preset", str(micro_preset),
            "--steps", "2"]
    assert train_main(args) == 0
    (run / "notes.txt").write_text("mine")
    before = _tree(run)
    capsys.readouterr()
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "--overwrite" in err
    assert _tree(run) == before
    with pytest.raises(ValueError, match="--overwrite"):  # the library refuses too
        train(_opts(tiny_corpus, micro_preset, run, steps=2))
    assert _tree(run) == before
    assert train_main(args + ["--resume"]) == 0
    assert [s for s, _ in _losses(run)] == [1, 2] and load_checkpoint(run)["step"] == 2
    (run / "tokenizer" / "stale.json").write_text("{}")
    (run / "ckpt" / ".last.pt.tmp-1").write_text("x")
    assert train_main(args + ["--overwrite"]) == 0
    assert [s for s, _ in _losses(run)] == [1, 2] and load_checkpoint(run)["step"] == 2
    assert not (run / "tokenizer" / "stale.json").exists()
    assert not (run / "ckpt" / ".last.pt.tmp-1").exists()
    assert (run / "notes.txt").read_text() == "mine"


def test_presets_load():
    from model.config import load_preset

    for name in ("tiny", "base"):
        cfg = load_preset(name)
        assert cfg.train.total_steps > 0 and cfg.image.image_size % cfg.image.patch_size == 0
        assert json.loads(json.dumps(cfg.to_dict()))["preset"] == name


def test_text_weights_from_local_folder(tiny_corpus, micro_preset, tmp_path):
    """--text-weights: a local pretrained BERT folder supplies weights and its own tokenizer."""
    from transformers import BertConfig, BertModel

    from model.checkpoint import load_run
    from model.text_tower import load_tokenizer, train_tokenizer

    folder = tmp_path / "bert"
    tok = load_tokenizer(train_tokenizer(["left lung nodule", "right kidney"], tmp_path / "t",
                                         100).parent)
    tok.save_pretrained(str(folder))
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64),
                     add_pooling_layer=False)
    bert.save_pretrained(str(folder))
    run = tmp_path / "run"
    train(_opts(tiny_corpus, micro_preset, run, steps=2, text_weights=folder))
    model, run_tok, cfg = load_run(run)
    assert cfg.text.weights == str(folder) and len(run_tok) == len(tok)
    assert model.text.width == 32
    sd = BertModel.from_pretrained(str(folder), add_pooling_layer=False).state_dict()
    assert not torch.equal(model.text.bert.embeddings.word_embeddings.weight,
                           sd["embeddings.word_embeddings.weight"])  # fine-tuned from it


def test_schedule_stages():
    from model.config import load_preset
    from model.train import lr_at, stage_of

    cfg = load_preset("tiny")  # stages 150 / 250 / 400, warm-up 50
    assert [stage_of(s, cfg) for s in (0, 149, 150, 399, 400, 799)] == [1, 1, 2, 2, 3, 3]
    lrs = [lr_at(s, cfg) for s in range(800)]
    assert lrs[0] == pytest.approx(cfg.train.lr / 50) and lrs[49] == pytest.approx(cfg.train.lr)
    assert all(a >= b for a, b in zip(lrs[49:-1], lrs[50:], strict=True))  # cosine: never rises
    assert lrs[-1] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio, rel=1e-3)
    cfg.model.global_only = True  # the ablation trains stage 1 throughout
    assert {stage_of(s, cfg) for s in range(800)} == {1}


def test_validation_rows_in_the_log(tiny_corpus, micro_preset, tmp_path):
    """--val-every 2: rows with split "val" at steps 2 and 4 (val losses, zero-shot accuracy),
    between the training rows; --keep-checkpoints 2 keeps the checkpoint before last.pt."""
    run = tmp_path / "run"
    assert train_main(["--corpus", str(tiny_corpus), "--out", str(run), "--preset",
                       str(micro_preset), "--steps", "4", "--val-every", "2", "--val-batches",
                       "2", "--ckpt-every", "2", "--keep-checkpoints", "2"]) == 0
    rows = read_log(run / "log.jsonl")
    val = [r for r in rows if r.get("split") == "val"]
    assert [r["step"] for r in val] == [2, 4]
    assert [r["step"] for r in rows if r.get("split") != "val"] == [1, 2, 3, 4]
    for r in val:
        assert {"global_loss", "region_loss", "negative_loss"} <= set(r) and r["val_regions"] > 0
        assert 0 <= r["zero_shot_region_acc"] <= 1 and r["val_batches"] >= 1
    assert sorted(p.name for p in (run / "ckpt").glob("step-*.pt")) == ["step-00000002.pt"]
