"""The caption checker on a real phantom corpus: all agree; tampering is caught."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.captions.check import verify_captions


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pipeline.phantoms.studies import make_phantoms
    from workflows.build_corpus import main

    root = tmp_path_factory.mktemp("captions")
    make_phantoms(root / "ph", patients=2, seed=3)
    assert main([str(root / "ph"), "--out", str(root / "corpus"), "--every-k", "0"]) == 0
    return root / "corpus"


def test_phantom_corpus_agrees_fully(corpus):
    report = verify_captions(corpus)
    assert report["ok"], report["problems"][:3]
    assert report["regions"] > 100 and report["negatives"] >= 3 * report["regions"]
    assert report["caption_agreement"] == report["negative_contradiction"] == 1.0


def _tamper(corpus, tmp_path, edit):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = next(m for m in manifest["shards"].values() if "regions" in m["tables"])
    path = copy / shard["tables"]["regions"]["file"]
    rows = pq.read_table(path).to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    return verify_captions(copy)


def test_wrong_side_in_caption_is_caught(corpus, tmp_path):
    def edit(rows):
        r = next(r for r in rows if "on the right" in (r["caption_region"] or ""))
        r["caption_region"] = r["caption_region"].replace("on the right", "on the left")

    report = _tamper(corpus, tmp_path, edit)
    assert not report["ok"] and report["problems"][0]["what"] == "caption"


def test_negative_that_is_true_is_caught(corpus, tmp_path):
    def edit(rows):
        r = next(r for r in rows if r["negatives"])
        r["negatives"][0] = r["caption_region"]

    report = _tamper(corpus, tmp_path, edit)
    assert not report["ok"] and report["problems"][0]["what"].startswith("negative")


def test_browse_catalog_verify_captions_exit_codes(corpus, tmp_path, capsys):
    from workflows.browse_catalog import main

    assert main([str(corpus), "--verify-captions"]) == 0
    assert '"caption_agreement": 1.0' in capsys.readouterr().out

    def edit(rows):
        r = next(r for r in rows if "on the left" in (r["caption_region"] or ""))
        r["caption_region"] = r["caption_region"].replace("on the left", "on the right")

    _tamper(corpus, tmp_path, edit)
    assert main([str(tmp_path / "copy"), "--verify-captions"]) == 1
