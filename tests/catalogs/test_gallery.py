"""The HTML gallery: pagination, files, determinism, escaping, label mixing and colours, overlay
and zoom pixels, and in real headless Chromium: every image loads, a filter hides cards, a click
opens the details."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from browser import run_chromium
from catalog_helpers import corpus_once
from hypothesis import given, settings
from hypothesis import strategies as st
from markupsafe import escape
from pycocotools import mask as mask_utils

from catalogs.corpus import Corpus, CorpusError
from catalogs.gallery import (
    BOX_BGR,
    PALETTE,
    TEMPLATES,
    card_values,
    label_colors,
    mix,
    render_thumbnail,
    write_gallery,
    zoom_window,
)
from workflows.browse_catalog import main as browse

WHERE = "label IN ('liver', 'lung_nodule', 'spine')"
PAGES = ["index.html", "page-002.html", "page-003.html"]


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
        self.tags, self.imgs, self.links, self.cards, self.scripts = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a)
        if tag == "a":
            self.links.append(a)
        if tag == "figure":
            self.cards.append(a)
        if tag == "script":
            self.scripts.append(a)


def _parse(path: Path) -> _Tags:
    p = _Tags()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_pages_links_and_thumbnails(gallery):
    assert sorted(p.name for p in gallery.glob("*.html")) == PAGES  # 30 cards, 12 per page
    thumbs = {p.name for p in (gallery / "thumbs").rglob("*.png")}
    assert len([t for t in thumbs if not t.endswith("-zoom.png")]) == 30
    meta = json.loads((gallery / "gallery.json").read_text())
    assert meta["regions"] == 30 and meta["pages"] == 3 and meta["where"] == WHERE
    cards, srcs = [], []
    for i, name in enumerate(PAGES, start=1):
        parsed = _parse(gallery / name)
        assert parsed.scripts == [{}]  # one inline script, nothing loaded
        assert "http" not in (gallery / name).read_text()
        cards += parsed.cards
        for img in parsed.imgs:
            assert (gallery / img["src"]).is_file() and int(img["width"]) > 0
            srcs.append(img["src"])
        rel = {a.get("rel"): a["href"] for a in parsed.links if a.get("rel")}
        assert rel.get("prev") == (None if i == 1 else PAGES[i - 2])
        assert rel.get("next") == (None if i == 3 else PAGES[i])
    assert len(cards) == 30 and sorted(Path(s).name for s in srcs) == sorted(thumbs)
    zoomed = [c for c in cards if "zoom" in c["class"].split()]
    assert 0 < len(zoomed) < 30  # small regions only
    text = (gallery / "index.html").read_text()
    assert "page 1 of 3" in text and f"<code>{escape(WHERE)}</code>" in text
    labels = [c["data-label"] for c in cards]
    assert set(labels) == {"liver", "lung_nodule", "spine"}
    assert len(set(labels[:3])) == 3  # labels mixed: page 1 opens with one card of each


def test_label_order_on_request(corpus_dir, tmp_path):
    out = write_gallery(Corpus.open(corpus_dir), tmp_path / "g", where=WHERE, limit=30,
                        page_size=40, order="label").parent
    labels = [c["data-label"] for c in _parse(out / "index.html").cards]
    assert len(labels) == 30 and labels == sorted(labels)
    with pytest.raises(CorpusError, match="order"):
        write_gallery(Corpus.open(corpus_dir), tmp_path / "g", order="random")


def test_output_is_deterministic(corpus_dir, gallery, tmp_path):
    again = write_gallery(Corpus.open(corpus_dir), tmp_path / "g2", where=WHERE, page_size=12,
                          limit=30).parent
    assert _files(again) == _files(gallery)
    # rewriting into an earlier gallery folder replaces it exactly
    write_gallery(Corpus.open(corpus_dir), again, where="label = 'spine'", page_size=5,
                  limit=7)
    assert len(list((again / "thumbs").rglob("*[!m].png"))) == 7
    write_gallery(Corpus.open(corpus_dir), again, where=WHERE, page_size=12, limit=30)
    assert _files(again) == _files(gallery)


def test_refuses_foreign_nonempty_folder(corpus_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CorpusError, match="not a gallery"):
        write_gallery(Corpus.open(corpus_dir), tmp_path, limit=2)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_text_is_escaped():
    evil = '<script>alert("x")</script>&<u>'
    row = {"region_id": "r" * 32, "image_id": "i" * 24, "label": evil,
           "laterality": "<em>left</em>", "caption_region": evil, "negatives": [evil],
           "negative_kinds": ["<kind>"], "caption_summary": evil, "caption_report": evil,
           "source": evil, "segmenter": "s", "score": 0.5, "bbox": [1.0, 2.0, 5.0, 9.0],
           "area_mm2": 3.0, "area_px": 4, "max_diameter_mm": 2.0, "split": evil,
           "modality": evil, "window": evil}
    card = card_values(row, {"src": "a.png", "w": 10, "h": 10}, None, "#000000")
    page = TEMPLATES.get_template("gallery.html.j2").render(
        title=evil, corpus=evil, n_regions=1, limit=None, seed=0, where=evil, page_size=1,
        order_text="", legend=[{"value": evil, "text": evil, "n": 1, "color": "#000"}],
        facets=[{"name": "label", "options": [{"value": evil, "text": evil, "n": 1}]}],
        cell=100, page=1, pages=1, prev=None, next=None, links=[(1, "index.html")],
        cards=[card])
    parsed = _Tags()
    parsed.feed(page)
    assert len(parsed.scripts) == 1 and page.count("<script>") == 1
    assert not {"u", "em", "kind"} & set(parsed.tags)
    assert "&lt;script&gt;" in page and "&amp;" in page
    assert parsed.cards[0]["data-label"] == parsed.cards[0]["data-split"] == evil


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


def test_zoomed_crop_pixels():
    h, w = 120, 90
    gray = np.full((h, w), 60, np.uint8)
    png = cv2.imencode(".png", gray)[1].tobytes()
    mask = np.zeros((h, w), np.uint8)
    mask[110:116, 80:86] = 1  # a 6×6 region near the bottom-right corner
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle = {"size": [h, w], "counts": rle["counts"].decode()}
    box = [80.0, 110.0, 86.0, 116.0]
    window = zoom_window(box, (h, w))
    assert window == (66, 96, 90, 120)  # 24 px square around the box, shifted inside the image
    assert zoom_window([40.0, 50.0, 46.0, 56.0], (h, w)) == (31, 41, 55, 65)  # centred
    out = cv2.imdecode(np.frombuffer(render_thumbnail(png, rle, box, (255, 0, 0), 96, window),
                                     np.uint8), cv2.IMREAD_COLOR)
    assert out.shape == (96, 96, 3)  # scale 4: box edges at (80-66)*4 = 56 .. (86-66)*4-1 = 79
    for edge in ((56, 60), (79, 60), (60, 56), (60, 79)):
        assert tuple(out[edge]) == BOX_BGR
    for off in ((55, 60), (80, 60), (60, 55), (60, 80)):
        assert tuple(out[off]) != BOX_BGR
    assert out[68, 68][0] > out[68, 68][2] + 50  # inside the mask: blended with blue
    assert abs(int(out[80, 20][2]) - 60) <= 1  # outside: the grey image


@pytest.mark.parametrize("box,shape", [([0, 0, 40, 40], (100, 100)), ([10, 10, 20, 20], (40, 40)),
                                       (None, (100, 100)), ([1, 2, None, 4], (100, 100))])
def test_no_zoom_for_large_or_missing_boxes(box, shape):
    assert zoom_window(box, shape) is None


@settings(max_examples=200, deadline=None)
@given(st.integers(40, 600), st.integers(40, 600), st.data())
def test_zoom_window_holds_the_box(h, w, data):
    x0 = data.draw(st.floats(0, w - 1, allow_nan=False))
    y0 = data.draw(st.floats(0, h - 1, allow_nan=False))
    x1 = data.draw(st.floats(x0 + 0.5, min(w, x0 + w / 6), allow_nan=False))
    y1 = data.draw(st.floats(y0 + 0.5, min(h, y0 + h / 6), allow_nan=False))
    win = zoom_window([x0, y0, x1, y1], (h, w))
    if win is None:  # only when the window would be too large for this image
        assert math.ceil(max(24, 2 * max(x1 - x0, y1 - y0))) > min(h, w, max(h, w) / 3)
        return
    wx0, wy0, wx1, wy1 = win
    assert wx1 - wx0 == wy1 - wy0 >= 24 and 0 <= wx0 and 0 <= wy0 and wx1 <= w and wy1 <= h
    assert wx0 <= x0 and wy0 <= y0 and x1 <= wx1 and y1 <= wy1


rows_st = st.lists(st.fixed_dictionaries({"label": st.sampled_from(["a", "b", "c", None]),
                                          "modality": st.sampled_from(["CT", "MR"]),
                                          "source": st.sampled_from(["labels", "boxes"])}),
                   max_size=60)


@settings(max_examples=200, deadline=None)
@given(rows_st)
def test_mix_is_a_round_robin_permutation(rows):
    rows = [{**r, "i": i} for i, r in enumerate(rows)]
    out = mix(rows, ("label", "modality", "source"))
    assert sorted(r["i"] for r in out) == list(range(len(rows)))
    total = Counter(r["label"] for r in rows)
    seen = Counter()
    for r in out:  # a label comes again only once every label with rows left has had a turn
        seen[r["label"]] += 1
        left = [lb for lb in total if seen[lb] < total[lb] or lb == r["label"]]
        assert all(seen[r["label"]] - seen[lb] <= 1 for lb in left)
    for label in total:  # inside one label, modalities alternate the same way
        mods = [r["modality"] for r in out if r["label"] == label]
        n = Counter(mods)
        if len(n) == 2:
            k = 2 * min(n.values())
            assert all(mods[i] != mods[i + 1] for i in range(k - 1))


def _lab(hex_rgb: str) -> np.ndarray:
    rgb = np.array([[[int(hex_rgb[i:i + 2], 16) for i in (1, 3, 5)]]], np.float32) / 255
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[0, 0]


def test_label_colours_are_distinct_and_fixed_by_sorted_order():
    colors = label_colors(["spleen", "aorta", "lung_nodule", None, "aorta"])
    assert list(colors) == ["aorta", "lung_nodule", "spleen", None]
    assert [f"#{c[2]:02x}{c[1]:02x}{c[0]:02x}" for c in colors.values()] == list(PALETTE[:4])
    many = label_colors([f"l{i:02d}" for i in range(len(PALETTE))])
    assert len(set(many.values())) == len(PALETTE)  # up to 16 labels, 16 colours
    box = f"#{BOX_BGR[2]:02x}{BOX_BGR[1]:02x}{BOX_BGR[0]:02x}"
    for i, c in enumerate(PALETTE):  # CIE76 ΔE in Lab
        assert np.linalg.norm(_lab(c) - _lab(PALETTE[(i + 1) % len(PALETTE)])) > 30
        assert np.linalg.norm(_lab(c) - _lab(box)) > 20
        a, b = _lab(c)[1:]
        assert np.hypot(a, b) > 15  # no grey: it would vanish on a grey-scale image


def test_corpus_labels_get_their_own_colours(corpus_dir, gallery):
    labels = Corpus.open(corpus_dir).regions().select("label").unique().collect()["label"]
    assert 10 <= len(labels) <= len(PALETTE)
    colors = label_colors(labels)
    assert len(set(colors.values())) == len(labels)
    assert len({colors["aorta"], colors["lung_nodule"], colors["spleen"]}) == 3
    legend = re.findall(r'data-label="([a-z_]+)"><i style="background:(#[0-9a-f]{6})',
                        (gallery / "index.html").read_text())
    assert legend and all(c == "#{2:02x}{1:02x}{0:02x}".format(*colors[lb]) for lb, c in legend)


def test_browse_catalog_writes_gallery(corpus_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert browse([str(corpus_dir), "--where", "label = 'spleen'", "--html", str(out),
                   "--page-size", "4", "--limit", "6"]) == 0
    assert f"gallery: {out / 'index.html'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.html")) == ["index.html", "page-002.html"]
    for order in ("mixed", "label"):
        assert browse([str(corpus_dir), "--where", WHERE, "--html", str(tmp_path / order),
                       "--limit", "12", "--gallery-order", order]) == 0
        labels = [c["data-label"] for c in _parse(tmp_path / order / "index.html").cards]
        assert len(labels) == 12 and (labels == sorted(labels)) == (order == "label")


# -- real browser --------------------------------------------------------------------------------

PROBE = """<script>
window.addEventListener('load', function () {
  function cards() { return Array.prototype.slice.call(document.querySelectorAll('.card')); }
  function shown() {
    return cards().filter(function (c) { return c.offsetParent !== null; })
                  .map(function (c) { return c.dataset.label; });
  }
  var out = {before: shown(), href: location.hash};
  out.imgs = Array.prototype.slice.call(document.images).map(function (i) {
    return [i.getAttribute('src'), i.complete, i.naturalWidth]; });
  var sel = document.querySelector('select[name=label]');
  sel.value = 'spine'; sel.dispatchEvent(new Event('change'));
  out.spine = shown();
  out.hash = location.hash;
  out.next = (document.querySelector('a[rel=next]') || {}).href || '';
  var first = cards()[0];
  first.click();
  out.dialog = [document.getElementById('details').open,
                document.querySelector('#details .body').textContent,
                first.querySelector('.info').textContent];
  var pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>"""


def _probe(page: Path, profile: Path, fragment: str = "") -> dict:
    r = run_chromium(["--virtual-time-budget=10000", "--dump-dom", page.as_uri() + fragment],
                      profile)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert m, r.stdout[-2000:]
    return json.loads(html.unescape(m.group(1)))


@pytest.fixture
def probes(gallery, tmp_path) -> Path:
    """The gallery plus a probe page per page, outside the fixture's folder."""
    out = tmp_path / "probes"
    shutil.copytree(gallery, out)
    for name in PAGES:
        page = (gallery / name).read_text(encoding="utf-8")
        (out / f"probe-{name}").write_text(page.replace("</body>", PROBE + "</body>"),
                                           encoding="utf-8")
    return out


def test_every_image_loads_in_headless_chromium(probes, tmp_path):
    total = 0
    for name in PAGES:
        results = _probe(probes / f"probe-{name}", tmp_path / "profile")["imgs"]
        assert len(results) == len(_parse(probes / name).imgs) > 0
        for src, complete, width in results:
            assert complete and width > 0, src
        total += len(_parse(probes / name).cards)
    assert total == 30
    # the probe does see a broken thumbnail
    first = _parse(probes / "index.html").imgs[0]["src"]
    (probes / first).unlink()
    imgs = _probe(probes / "probe-index.html", tmp_path / "profile")["imgs"]
    assert [src for src, complete, width in imgs if not width] == [first]


def test_filter_hides_cards_and_click_opens_details(probes, tmp_path):
    labels = [c["data-label"] for c in _parse(probes / "index.html").cards]
    got = _probe(probes / "probe-index.html", tmp_path / "profile")
    assert got["before"] == labels and "spine" in labels and set(labels) != {"spine"}
    assert got["spine"] == [lb for lb in labels if lb == "spine"]  # the others are hidden
    assert got["hash"] == "#label=spine" and got["next"].endswith("page-002.html#label=spine")
    is_open, shown, info = got["dialog"]
    assert is_open and info and info in shown  # the card's details, in the dialog
    caption = _parse(probes / "index.html").cards[0]
    assert caption["data-label"] in shown
    # the filter rides on the page link: page 2 opens filtered
    page2 = [c["data-label"] for c in _parse(probes / "page-002.html").cards]
    got2 = _probe(probes / "probe-page-002.html", tmp_path / "profile", "#label=liver")
    assert got2["href"] == "#label=liver"
    assert got2["before"] == [lb for lb in page2 if lb == "liver"] != page2


def test_screenshot_renders(gallery, tmp_path):
    shot = tmp_path / "gallery.png"
    r = run_chromium([f"--screenshot={shot}", "--window-size=1280,1600",
                       (gallery / "index.html").as_uri()], tmp_path / "profile")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img.shape[:2] == (1600, 1280)
    # some thumbnail pixels carry the yellow box colour
    assert (np.abs(img.astype(int) - np.array(BOX_BGR)).sum(-1) < 60).sum() > 100
