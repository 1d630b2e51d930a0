"""The corpus's stored tokenizer: built from caption columns only, atomically, once per set of
committed shards; train-model uses it instead of building one."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from model import tokenizer as store
from model.data import CorpusIndex
from model.text_tower import load_tokenizer
from workflows.build_tokenizer import main as build_main


def _spy_reads(monkeypatch) -> list[list[str] | None]:
    """Record the columns every pyarrow read asks for."""
    seen: list = []
    real_table, real_group = pq.read_table, pq.ParquetFile.read_row_group

    def table(path, *a, columns=None, **k):
        seen.append(columns)
        return real_table(path, *a, columns=columns, **k)

    def group(self, i, columns=None, **k):
        seen.append(columns)
        return real_group(self, i, columns=columns, **k)

    monkeypatch.setattr(pq, "read_table", table)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", group)
    return seen


def test_caption_texts_read_caption_columns_only(tiny_corpus, monkeypatch):
    c = CorpusIndex.open(tiny_corpus)
    seen = _spy_reads(monkeypatch)
    texts = list(store.caption_texts(c))
    assert texts and seen
    assert all(cols is not None and "image" not in cols and "mask_rle" not in cols
               for cols in seen)


def test_build_tokenizer_stores_once(tiny_corpus, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    assert build_main(["--corpus", str(corpus), "--vocab-size", "300"]) == 0
    out = json.loads(capsys.readouterr().out)
    folder = store.stored_dir(corpus, 300)
    assert out["built"] and out["tokenizer"] == str(folder)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["source"] == store.source_of(CorpusIndex.open(corpus))
    assert len(load_tokenizer(folder)) <= 300
    first = (folder / "tokenizer.json").read_bytes()
    assert build_main(["--corpus", str(corpus), "--vocab-size", "300"]) == 0
    assert not json.loads(capsys.readouterr().out)["built"]  # same shards: kept
    meta["source"]["sha256"] = "stale"
    (folder / "meta.json").write_text(json.dumps(meta))
    assert build_main(["--corpus", str(corpus), "--vocab-size", "300"]) == 0
    assert json.loads(capsys.readouterr().out)["built"]  # other shards: rebuilt, same captions
    assert (folder / "tokenizer.json").read_bytes() == first
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporaries
    assert build_main(["--corpus", str(tmp_path), "--vocab-size", "300"]) == 2
    assert "--corpus" in capsys.readouterr().err


def test_build_is_atomic(tiny_corpus, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    store.build_stored(corpus, 300)
    before = (store.stored_dir(corpus, 300) / "tokenizer.json").read_bytes()

    def crash(texts, out_dir, vocab):
        out_dir.mkdir(parents=True)
        (out_dir / "tokenizer.json").write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(store, "train_tokenizer", crash)
    (store.stored_dir(corpus, 300) / "meta.json").write_text('{"source": {}}')  # force a rebuild
    with pytest.raises(OSError):
        store.build_stored(corpus, 300)
    assert (store.stored_dir(corpus, 300) / "tokenizer.json").read_bytes() == before


def test_train_uses_the_stored_tokenizer(tiny_corpus, micro_preset, tmp_path, monkeypatch):
    """A stored tokenizer: the run copies it and no caption is read for text."""
    from model import train as train_mod
    from model.config import load_preset

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    vocab = load_preset(str(micro_preset)).text.vocab_size
    folder, _ = store.build_stored(corpus, vocab)

    def refuse(*a, **k):
        raise AssertionError("captions read for the tokenizer although one is stored")

    monkeypatch.setattr(store, "build_in_memory", refuse)
    run = tmp_path / "run"
    train_mod.train(train_mod.TrainOptions(corpus=corpus, out=run, preset=str(micro_preset),
                                           steps=2))
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == \
        (folder / "tokenizer.json").read_bytes()
