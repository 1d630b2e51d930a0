"""catalogs.verify: split leakage (patients, identical bytes) and perceptual near-duplicates."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from catalog_helpers import add_shard, copy_corpus, corpus_once, first_rows

from catalogs import verify
from catalogs.corpus import Corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    return corpus_once(tmp_path_factory)


def _other_split(split: str) -> str:
    return "test" if split != "test" else "train"


def _noisy_png(png: bytes, sigma: float = 2.0, seed: int = 0) -> bytes:
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    noise = np.random.default_rng(seed).normal(0, sigma, img.shape)
    out = np.clip(img.astype(np.float64) + noise, 0, np.iinfo(img.dtype).max).astype(img.dtype)
    return cv2.imencode(".png", out)[1].tobytes()


# -- hashes --------------------------------------------------------------------------------------

def _shapes(kind: int, size: int = 128) -> np.ndarray:
    img = np.zeros((size, size), np.uint8)
    if kind == 0:
        cv2.circle(img, (40, 40), 25, 200, -1)
    elif kind == 1:
        cv2.rectangle(img, (60, 20), (120, 70), 180, -1)
    elif kind == 2:
        cv2.ellipse(img, (64, 90), (50, 20), 0, 0, 360, 150, -1)
    else:
        img[:] = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))
    return img


@pytest.mark.parametrize("method", ["phash", "dhash"])
def test_hash_is_64_bit_and_separates_shapes(method):
    fn = verify.phash64 if method == "phash" else verify.dhash64
    hashes = [fn(_shapes(k).astype(np.float32)) for k in range(4)]
    assert all(0 <= h < 2**64 for h in hashes) and len(set(hashes)) == 4
    d = verify.popcount64(np.array(hashes, np.uint64)[:, None] ^ np.array(hashes, np.uint64))
    assert d[np.triu_indices(4, 1)].min() > 8  # distinct pictures are far apart
    png = cv2.imencode(".png", _shapes(0))[1].tobytes()
    rec = verify.hash_png(png, method)
    assert rec["hash"] == hashes[0] and len(rec["sha256"]) == 64 and not rec["blank"]
    assert verify.hash_png(cv2.imencode(".png", np.zeros((32, 32), np.uint8))[1].tobytes(),
                           method)["blank"]


def test_phash_is_stable_under_noise_and_16_bit():
    img = _shapes(2)
    h = verify.phash64(img.astype(np.float32))
    noisy = verify.decode_png(_noisy_png(cv2.imencode(".png", img)[1].tobytes(), sigma=3))
    assert bin(verify.phash64(noisy) ^ h).count("1") <= 2
    png16 = cv2.imencode(".png", img.astype(np.uint16) * 257)[1].tobytes()
    assert verify.hash_png(png16)["hash"] == h


def test_hamming_pairs_match_brute_force():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, (40, 3)).astype(np.uint64)
    hashes = np.concatenate([base, base ^ flips[:, 0], base ^ flips[:, 0] ^ flips[:, 1]
                             ^ flips[:, 2]])
    d = verify.popcount64(hashes[:, None] ^ hashes[None, :])
    for max_distance in (0, 1, 3, 6):
        got = verify.hamming_pairs(hashes, max_distance)
        want = [(i, j, int(d[i, j])) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                if d[i, j] <= max_distance]
        assert got == want
    skip = np.zeros(len(hashes), bool)
    skip[0] = True
    assert all(0 not in (i, j) for i, j, _ in verify.hamming_pairs(hashes, 3, skip=skip))


# -- leakage -------------------------------------------------------------------------------------

def test_real_corpus_has_no_leak(corpus_dir):
    report = verify.check_leakage(Corpus.open(corpus_dir))
    assert report["ok"], report
    assert report["patients"] == 6 and report["images"] == Corpus.open(corpus_dir).count("images")
    assert report["n_patient_leaks"] == report["n_image_leaks"] == 0


def test_injected_patient_leak_is_found(corpus_dir, tmp_path):
    root = copy_corpus(corpus_dir, tmp_path / "c")
    row = first_rows(root, "regions")[0]
    leaked = dict(row, region_id="f" * 32, split=_other_split(row["split"]))
    manifest = add_shard(root, "shard-09000", {"regions": [leaked]})
    assert verify.check_leakage(Corpus.open(root))["ok"]  # not in the committed manifest
    report = verify.check_leakage(Corpus.open(root, manifest=manifest))
    assert not report["ok"] and report["n_patient_leaks"] == 1
    leak = report["patients_in_multiple_splits"][0]
    assert leak["patient_key"] == row["patient_key"]
    assert leak["splits"] == sorted({row["split"], leaked["split"]})
    assert "regions" in leak["tables"]
    assert report["n_image_leaks"] == 0


def test_browse_catalog_check_leakage_exit_status(corpus_dir, tmp_path, capsys):
    from workflows.browse_catalog import main as browse

    assert browse([str(corpus_dir), "--check-leakage", "--limit", "0"]) == 0
    assert '"ok": true' in capsys.readouterr().out
    root = copy_corpus(corpus_dir, tmp_path / "c")
    row = first_rows(root, "series")[0]
    add_shard(root, "shard-09003", {"series": [dict(row, unit_key="w" * 24,
                                                     split=_other_split(row["split"]))]},
              root / "manifest.json")
    assert browse([str(root), "--check-leakage", "--limit", "0"]) == 1
    captured = capsys.readouterr()
    assert '"ok": false' in captured.out and row["patient_key"] in captured.out
    assert "LEAK" in captured.err


def test_identical_image_bytes_across_splits_are_found(corpus_dir, tmp_path):
    root = copy_corpus(corpus_dir, tmp_path / "c")
    row = first_rows(root, "images")[0]
    dup = dict(row, image_id="e" * 24, patient_key="p" * 24, series_key="s" * 24,
               unit_key="u" * 24, split=_other_split(row["split"]))
    report = verify.check_leakage(Corpus.open(root, manifest=add_shard(
        root, "shard-09001", {"images": [dup]})))
    assert not report["ok"] and report["n_patient_leaks"] == 0 and report["n_image_leaks"] == 1
    hit = report["identical_images_across_splits"][0]
    assert sorted(hit["image_ids"]) == sorted([row["image_id"], dup["image_id"]])


# -- near-duplicates -----------------------------------------------------------------------------

def _with_noisy_duplicate(corpus_dir, tmp_path):
    """A copy whose extra shard holds one image: the slice with the widest lungs of the first
    series plus tiny noise, under another patient, series and split. Also returns the
    series' slices without lung (abdomen, pelvis): other anatomy, the same volume."""
    root = copy_corpus(corpus_dir, tmp_path / "c")
    rows = first_rows(root, "images", 10**6)
    series = rows[0]["series_key"]
    same = [r for r in rows if r["series_key"] == series]
    lung = {}
    for r in first_rows(root, "regions", 10**6, lambda r: r["series_key"] == series
                        and r["label"].startswith("lung_")):
        lung[r["image_id"]] = lung.get(r["image_id"], 0) + r["area_px"]
    orig = next(r for r in same if r["image_id"] == max(lung, key=lung.get))
    other = [r for r in same if r["image_id"] not in lung]
    dup = dict(orig, image_id="d" * 24, patient_key="q" * 24, series_key="t" * 24,
               unit_key="v" * 24, split=_other_split(orig["split"]),
               image={"bytes": _noisy_png(orig["image"]["bytes"]), "path": None})
    assert dup["image"]["bytes"] != orig["image"]["bytes"]
    manifest = add_shard(root, "shard-09002", {"images": [dup]}, root / "manifest.json")
    return Corpus.open(manifest.parent), orig, dup, other


def test_noisy_duplicate_is_flagged_and_other_slices_are_not(corpus_dir, tmp_path):
    corpus, orig, dup, other = _with_noisy_duplicate(corpus_dir, tmp_path)
    pairs = verify.near_duplicates(corpus, max_distance=4)
    hit = pairs.filter((pairs["image_id_a"] == orig["image_id"])
                       & (pairs["image_id_b"] == dup["image_id"]))
    assert hit.height == 1
    assert hit["distance"][0] <= 2 and hit["cross_split"][0] and not hit["same_patient"][0]
    # the exact-bytes check does not see it (different bytes), the perceptual one does
    assert verify.check_leakage(corpus)["n_image_leaks"] == 0

    # different slices (other anatomy) of the same volume: far apart, not flagged even when
    # same-series pairs are asked for
    hashes = verify.image_hashes(corpus)
    h = dict(zip(hashes["image_id"], hashes["hash"].to_list(), strict=True))
    all_pairs = verify.near_duplicates(corpus, max_distance=4, include_same_series=True,
                                       hashes=hashes)
    flagged = set(zip(all_pairs["image_id_a"], all_pairs["image_id_b"], strict=True))
    assert len(other) >= 10
    for s in other:
        assert bin(h[s["image_id"]] ^ h[orig["image_id"]]).count("1") > 8
        assert tuple(sorted((s["image_id"], orig["image_id"]))) not in flagged
        assert tuple(sorted((s["image_id"], dup["image_id"]))) not in flagged
    # same-series pairs (neighbouring slices) only appear on request
    assert not (pairs["series_key_a"] == pairs["series_key_b"]).any()
    assert (all_pairs["series_key_a"] == all_pairs["series_key_b"]).any()


def test_verify_captions_through_the_corpus_api(corpus_dir):
    report = verify.verify_captions(Corpus.open(corpus_dir))
    assert report["ok"] and report["regions"] > 0
