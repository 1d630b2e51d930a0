"""The HTML gallery: pagination, files, determinism, escaping, overlay pixels, and every
thumbnail loading in real headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from catalog_helpers import corpus_once
from pycocotools import mask as mask_utils

from catalogs.corpus import Corpus, CorpusError
from catalogs.gallery import (
    BOX_BGR,
    _card,
    label_color,
    render_thumbnail,
    write_gallery,
)
from workflows.browse_catalog import main as browse

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
WHERE = "label IN ('liver', 'lung_nodule', 'spine')"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    return corpus_once(tmp_path_factory)


@pytest.fixture(scope="session")
def gallery(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery") / "g"
    index = write_gallery(Corpus.open(corpus_dir), out, where=WHERE, page_size=12, limit=30)
    return index.parent


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.imgs, self.links = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a)
        if tag == "a":
            self.links.append(a)


def _parse(path: Path) -> _Tags:
    p = _Tags()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_pages_links_and_thumbnails(gallery):
    pages = sorted(p.name for p in gallery.glob("*.html"))
    assert pages == ["index.html", "page-002.html", "page-003.html"]  # 30 cards, 12 per page
    thumbs = list((gallery / "thumbs").rglob("*.png"))
    assert len(thumbs) == 30
    meta = json.loads((gallery / "gallery.json").read_text())
    assert meta["regions"] == 30 and meta["pages"] == 3 and meta["where"] == WHERE
    n_cards = 0
    for i, name in enumerate(["index.html", "page-002.html", "page-003.html"], start=1):
        parsed = _parse(gallery / name)
        assert "script" not in parsed.tags
        n_cards += len(parsed.imgs)
        for img in parsed.imgs:
            assert (gallery / img["src"]).is_file() and int(img["width"]) > 0
        rel = {a.get("rel"): a["href"] for a in parsed.links if a.get("rel")}
        assert rel.get("prev") == (None if i == 1 else ["index.html", "page-002.html"][i - 2])
        assert rel.get("next") == (None if i == 3 else ["page-002.html", "page-003.html"][i - 1])
    assert n_cards == 30
    text = (gallery / "index.html").read_text()
    assert "page 1 of 3" in text and html.escape(WHERE) in text
    labels = re.findall(r"<h2>([a-z_]+)", "".join(
        (gallery / n).read_text() for n in ["index.html", "page-002.html", "page-003.html"]))
    assert len(labels) == 30 and set(labels) <= {"liver", "lung_nodule", "spine"}
    assert labels == sorted(labels)  # cards ordered by label


def test_output_is_deterministic(corpus_dir, gallery, tmp_path):
    again = write_gallery(Corpus.open(corpus_dir), tmp_path / "g2", where=WHERE, page_size=12,
                          limit=30).parent
    assert _files(again) == _files(gallery)
    # rewriting into an earlier gallery folder replaces it exactly
    write_gallery(Corpus.open(corpus_dir), again, where="label = 'spine'", page_size=5,
                  limit=7)
    assert len(list((again / "thumbs").rglob("*.png"))) == 7
    write_gallery(Corpus.open(corpus_dir), again, where=WHERE, page_size=12, limit=30)
    assert _files(again) == _files(gallery)


def test_refuses_foreign_nonempty_folder(corpus_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CorpusError, match="not a gallery"):
        write_gallery(Corpus.open(corpus_dir), tmp_path, limit=2)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_text_is_escaped():
    evil = '<script>alert("x")</script>&<b>'
    card = _card({"region_id": "r" * 32, "image_id": "i" * 24, "label": evil,
                  "laterality": "<i>left</i>", "caption_region": evil, "negatives": [evil],
                  "negative_kinds": ["<kind>"], "caption_summary": evil, "caption_report": evil,
                  "source": evil, "segmenter": "s", "score": 0.5, "bbox": [1.0, 2.0, 5.0, 9.0],
                  "area_mm2": 3.0, "area_px": 4, "max_diameter_mm": 2.0, "split": evil,
                  "_tw": 10, "_th": 10})
    parsed = _Tags()
    parsed.feed(card)
    assert "script" not in parsed.tags and "b" not in parsed.tags and "kind" not in parsed.tags
    assert "&lt;script&gt;" in card and "&amp;" in card


def test_overlay_and_box_pixels():
    h, w = 40, 50
    gray = np.full((h, w), 60, np.uint8)
    png = cv2.imencode(".png", gray)[1].tobytes()
    mask = np.zeros((h, w), np.uint8)
    mask[10:20, 5:25] = 1  # rows 10..19, cols 5..24
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle = {"size": [h, w], "counts": rle["counts"].decode()}
    color = (255, 0, 0)
    out = cv2.imdecode(np.frombuffer(render_thumbnail(png, rle, [5.0, 10.0, 25.0, 20.0], color,
                                                      size=100), np.uint8), cv2.IMREAD_COLOR)
    assert out.shape == (80, 100, 3)  # longer side 100, scale 2
    inside = out[30, 30]  # pixel (col 15, row 15) of the image → mask, blended with blue
    assert inside[0] > inside[1] + 50 and inside[0] > inside[2] + 50
    outside = out[60, 80]
    assert abs(int(outside[0]) - 60) <= 1 and abs(int(outside[2]) - 60) <= 1
    # the box runs on the pixel edges of [5, 25) × [10, 20) scaled by 2
    assert tuple(out[20, 30]) == BOX_BGR and tuple(out[39, 30]) == BOX_BGR
    assert tuple(out[30, 10]) == BOX_BGR and tuple(out[30, 49]) == BOX_BGR
    assert tuple(out[19, 30]) != BOX_BGR and tuple(out[40, 30]) != BOX_BGR


def test_label_colours_are_stable_and_not_the_box_colour():
    assert label_color("liver") == label_color("liver")
    assert all(label_color(x) != BOX_BGR for x in ("liver", "spleen", "aorta", "", None))


def test_browse_catalog_writes_gallery(corpus_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert browse([str(corpus_dir), "--where", "label = 'spleen'", "--html", str(out),
                   "--page-size", "4", "--limit", "6"]) == 0
    assert f"gallery: {out / 'index.html'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.html")) == ["index.html", "page-002.html"]


# -- real browser --------------------------------------------------------------------------------

CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var res = imgs.map(function (i) { return [i.getAttribute('src'), i.complete, i.naturalWidth]; });
  var pre = document.createElement('pre'); pre.id = 'imgcheck';
  pre.textContent = JSON.stringify(res); document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"headless Chromium not installed; install it with: {INSTALL}")


def _run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_every_thumbnail_loads_in_headless_chromium(gallery, tmp_path):
    probes = tmp_path / "probes"  # the gallery plus a probe script, outside the fixture's folder
    shutil.copytree(gallery, probes)
    total = 0
    for name in ["index.html", "page-002.html", "page-003.html"]:
        page = (gallery / name).read_text(encoding="utf-8")
        probe = probes / f"probe-{name}"
        probe.write_text(page.replace("</body>", CHECK + "</body>"), encoding="utf-8")
        r = _run_chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                          tmp_path / "profile")
        assert r.returncode == 0, r.stderr[-2000:]
        m = re.search(r'<pre id="imgcheck">(.*?)</pre>', r.stdout, re.S)
        assert m, r.stdout[-2000:]
        results = json.loads(html.unescape(m.group(1)))
        assert len(results) == len(_parse(gallery / name).imgs) > 0
        for src, complete, width in results:
            assert complete and width > 0, src
        total += len(results)
    assert total == 30
    # the probe does see a broken thumbnail
    first = _parse(gallery / "index.html").imgs[0]["src"]
    (probes / first).unlink()
    r = _run_chromium(["--virtual-time-budget=10000", "--dump-dom",
                       (probes / "probe-index.html").as_uri()], tmp_path / "profile")
    m = re.search(r'<pre id="imgcheck">(.*?)</pre>', r.stdout, re.S)
    broken = [src for src, complete, width in json.loads(html.unescape(m.group(1))) if not width]
    assert broken == [first]


def test_screenshot_renders(gallery, tmp_path):
    shot = tmp_path / "gallery.png"
    r = _run_chromium([f"--screenshot={shot}", "--window-size=1280,1600",
                       (gallery / "index.html").as_uri()], tmp_path / "profile")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img.shape[:2] == (1600, 1280)
    # some thumbnail pixels carry the yellow box colour
    assert (np.abs(img.astype(int) - np.array(BOX_BGR)).sum(-1) < 60).sum() > 100
