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
    assert report["regions"] > 100 and report["negatives"] >= 0.8 * report["regions"]
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


# ----------------------------------------------------------------------------- blind model


def test_blind_model_is_near_chance_on_an_unseen_seed(corpus):
    """The priors were measured on other phantom seeds (priors_v2.json); this corpus's seed
    (3) is not among them. A text-only classifier must not tell captions from negatives."""
    report = verify_captions(corpus)
    blind = report["blind"]
    assert blind["captions"] >= blind["min_captions"] and blind["folds"] == 5
    assert blind["balanced_accuracy"] <= 0.60 and blind["ok"] is True, blind
    assert report["ok"]


def _recaption_v1(corpus, tmp_path):
    """A copy of ``corpus`` whose captions and negatives are written by vocabulary v1 (the
    confuser lists and fixed example sizes that issue 23 replaced)."""
    from pipeline.captions.describe import describe_image
    from pipeline.images.png import decode_png

    copy = tmp_path / "v1"
    shutil.copytree(corpus, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for shard in manifest["shards"].values():
        tables = shard["tables"]
        if "regions" not in tables:
            continue
        ipath, rpath = copy / tables["images"]["file"], copy / tables["regions"]["file"]
        images, regions = pq.read_table(ipath).to_pylist(), pq.read_table(rpath).to_pylist()
        for image in images:
            mine = [r for r in regions if r["image_id"] == image["image_id"]]
            describe_image(image, decode_png(image), mine, manifest["caption_seed"],
                           version="v1")
        for path, rows in ((ipath, images), (rpath, regions)):
            pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    return copy


def test_old_negatives_fail_the_blind_check(corpus, tmp_path, capsys):
    """v1 captions still check out fact by fact, but their negatives carry text cues (a
    confuser no positive uses, "3 mm"): the blind classifier finds them and the check fails."""
    from workflows.browse_catalog import main

    old = _recaption_v1(corpus, tmp_path)
    report = verify_captions(old)
    assert report["caption_agreement"] == report["negative_contradiction"] == 1.0
    assert not report["problems"]
    assert report["blind"]["balanced_accuracy"] > 0.70 and report["blind"]["ok"] is False
    assert not report["ok"]
    capsys.readouterr()
    assert main([str(old), "--verify-captions"]) == 1
    out, err = capsys.readouterr()
    assert "text-only classifier" in err and '"balanced_accuracy"' in out
    assert main([str(old), "--verify-captions", "--blind-threshold", "1.0"]) == 0


def test_blind_threshold_flag(corpus, capsys):
    from workflows.browse_catalog import main

    assert main([str(corpus), "--verify-captions", "--blind-threshold", "0.5"]) == 1
    assert main([str(corpus), "--verify-captions", "--blind-threshold", "1.5"]) == 2
    assert "--blind-threshold" in capsys.readouterr().err
