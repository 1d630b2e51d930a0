"""Static, paginated HTML gallery of regions.

``write_gallery(corpus, OUT)`` writes one folder::

    OUT/index.html          page 1 (header: corpus, filter, counts, label colours)
    OUT/page-002.html ...   further pages, ``page_size`` cards each, prev/next links
    OUT/thumbs/ab/<region_id>.png   one thumbnail per region
    OUT/gallery.json        what was rendered (marks the folder as a gallery)

Each card shows the region's image with the mask overlaid (semi-transparent label colour and
its outline) and the box drawn (yellow, on the pixel edges of ``bbox``), then label,
laterality, size, source/segmenter/score, and the captions and negatives when the corpus has
those columns. All text is HTML-escaped. The same corpus and arguments give byte-identical
files (stable order, no timestamps, deterministic PNG encoding). No scripts, no network.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import shutil
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from .corpus import Corpus, CorpusError
from .verify import decode_png

THUMB_SIZE = 256
ALPHA = 0.45
BOX_BGR = (0, 230, 255)  # yellow
# Distinct label colours (BGR), none of them yellow so the box stays distinguishable.
PALETTE = [(60, 60, 255), (255, 140, 30), (80, 220, 60), (255, 60, 220), (200, 200, 40),
           (40, 140, 255), (180, 90, 255), (120, 255, 180), (255, 200, 140), (40, 90, 200),
           (150, 40, 150), (0, 160, 110)]
SORT_KEYS = ("label", "series_key", "slice_index", "region_id")
CARD_COLUMNS = ("region_id", "image_id", "series_key", "patient_key", "split", "modality",
                "plane", "slice_index", "window", "label", "laterality", "source", "segmenter",
                "score", "bbox", "mask_rle", "area_px", "area_mm2", "max_diameter_mm",
                "caption_region", "negatives", "negative_kinds", "caption_summary",
                "caption_report")
MARKER = "gallery.json"


def label_color(label: str | None) -> tuple[int, int, int]:
    """Stable BGR colour for a label (same label → same colour in every run)."""
    digest = hashlib.sha256((label or "").encode()).digest()
    return PALETTE[digest[0] % len(PALETTE)]


def _decode_mask(rle: dict, shape: tuple[int, int]) -> np.ndarray:
    counts = rle["counts"]
    mask = mask_utils.decode({"size": [int(v) for v in rle["size"]],
                              "counts": counts.encode() if isinstance(counts, str) else counts})
    mask = np.asarray(mask, np.uint8)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != shape:  # should not happen; keep the card readable if it does
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return mask


def render_thumbnail(png: bytes, rle: dict | None, bbox: Sequence[float] | None,
                     color: tuple[int, int, int], size: int = THUMB_SIZE) -> bytes:
    """PNG bytes: the image scaled so its longer side is ``size``, the mask blended in
    ``color`` (alpha 0.45) with its outline, and the box drawn on the scaled pixel edges
    (bbox [x0, y0, x1, y1]: pixel (c, r) covers [c, c+1) × [r, r+1))."""
    gray = decode_png(png)
    h, w = gray.shape
    s = size / max(h, w)
    tw, th = max(1, round(w * s)), max(1, round(h * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    base = cv2.resize(np.clip(gray, 0, 255).astype(np.uint8), (tw, th), interpolation=interp)
    out = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR)
    if rle is not None and rle.get("counts") is not None:
        mask = _decode_mask(rle, (h, w))
        if s >= 1:
            m = cv2.resize(mask, (tw, th), interpolation=cv2.INTER_NEAREST).astype(bool)
        else:  # keep thin structures when shrinking
            m = cv2.resize(mask.astype(np.float32), (tw, th), interpolation=cv2.INTER_AREA) > 0.25
        blend = cv2.addWeighted(out, 1 - ALPHA, np.full_like(out, color), ALPHA, 0.0)
        out[m] = blend[m]
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, color, 1)
    if bbox is not None and len(bbox) == 4 and all(v is not None for v in bbox):
        x0, y0, x1, y1 = (float(v) for v in bbox)
        p0 = (math.floor(x0 * s), math.floor(y0 * s))
        p1 = (max(p0[0], math.ceil(x1 * s) - 1), max(p0[1], math.ceil(y1 * s) - 1))
        cv2.rectangle(out, p0, p1, BOX_BGR, 1)
    ok, buf = cv2.imencode(".png", out, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


# -- HTML ----------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;margin:16px;background:#111;color:#ddd}
a{color:#8cf}
header h1{font-size:20px;margin:0 0 4px}
.meta{color:#aaa;font-size:13px}
nav{margin:12px 0;font-size:14px}
nav a,nav span{margin-right:8px}
.legend span{display:inline-block;margin:2px 8px 2px 0;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(272px,1fr));gap:12px}
.card{background:#1c1c1c;border:1px solid #333;border-radius:6px;padding:8px;margin:0}
.card img{display:block;width:256px;max-width:100%;height:auto;image-rendering:pixelated}
.card h2{font-size:15px;margin:6px 0 2px}
.card p{margin:2px 0;font-size:12px;line-height:1.35}
.card .ids{color:#777;font-family:monospace;font-size:11px}
.card .cap{color:#eee}
.card .neg{color:#f99;font-size:12px}
.card ul.neg{margin:0;padding-left:16px}
.card details{font-size:12px}
""".strip()


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _page_name(i: int) -> str:
    """Page 1 is index.html, page i > 1 is page-00i.html."""
    return "index.html" if i == 1 else f"page-{i:03d}.html"


def _thumb_rel(region_id: str) -> str:
    return f"thumbs/{region_id[:2]}/{region_id}.png"


def _nav(i: int, n: int) -> str:
    parts = []
    parts.append(f'<a rel="prev" href="{_page_name(i - 1)}">&laquo; prev</a>' if i > 1
                 else "<span>&laquo; prev</span>")
    parts.append(f"<span>page {i} of {n}</span>")
    parts.append(f'<a rel="next" href="{_page_name(i + 1)}">next &raquo;</a>' if i < n
                 else "<span>next &raquo;</span>")
    window = range(max(1, i - 5), min(n, i + 5) + 1)
    links = [f'<a href="{_page_name(k)}">{k}</a>' if k != i else f"<b>{k}</b>" for k in window]
    return f'<nav>{" ".join(parts)} | {" ".join(links)}</nav>'


def _card(r: dict) -> str:
    label = r.get("label") or "(no label)"
    lat = r.get("laterality")
    head = _e(label) + (f' <small>({_e(lat)})</small>' if lat and lat != "none" else "")
    bbox = r.get("bbox") or []
    box = (f"{bbox[2] - bbox[0]:.0f}×{bbox[3] - bbox[1]:.0f} px" if len(bbox) == 4
           and all(v is not None for v in bbox) else "–")
    where = " · ".join(_e(v) for v in (r.get("split"), r.get("modality"), r.get("plane"))
                       if v is not None)
    if r.get("slice_index") is not None:
        where += f" · slice {_e(r['slice_index'])}"
    if r.get("window"):
        where += f" · {_e(r['window'])}"
    source = _e(r.get("source") or "–")
    if r.get("segmenter") and r.get("segmenter") != r.get("source"):
        source += f" / {_e(r['segmenter'])}"
    score = r.get("score")
    lines = [
        f'<img src="{_e(_thumb_rel(r["region_id"]))}" alt="{_e(label)}" '
        f'width="{r["_tw"]}" height="{r["_th"]}">',
        f"<h2>{head}</h2>",
        f"<p>{where}</p>",
        f"<p>area {_num(r.get('area_mm2'))} mm² ({_e(r.get('area_px'))} px) · "
        f"max ⌀ {_num(r.get('max_diameter_mm'))} mm · box {box}</p>",
        f"<p>source {source}" + (f" · score {_num(score, 3)}" if score is not None else "")
        + "</p>",
    ]
    if r.get("caption_region"):
        lines.append(f'<p class="cap">{_e(r["caption_region"])}</p>')
    negatives = r.get("negatives")
    if isinstance(negatives, str):
        negatives = [negatives]
    if negatives:
        kinds = r.get("negative_kinds")
        kinds = kinds if isinstance(kinds, list) and len(kinds) == len(negatives) else None
        items = "".join(
            f"<li>{_e(n)}" + (f" <small>[{_e(kinds[i])}]</small>" if kinds and kinds[i] else "")
            + "</li>" for i, n in enumerate(negatives) if n is not None)
        lines.append(f'<p class="neg">negatives:</p><ul class="neg">{items}</ul>')
    if r.get("caption_summary"):
        lines.append(f'<p class="cap">image: {_e(r["caption_summary"])}</p>')
    if r.get("caption_report"):
        lines.append(f"<details><summary>report</summary><p>{_e(r['caption_report'])}</p>"
                     "</details>")
    lines.append(f'<p class="ids">region {_e(r["region_id"][:16])} · image '
                 f'{_e((r.get("image_id") or "")[:16])}</p>')
    return '<figure class="card">' + "".join(lines) + "</figure>"


def _thumb_card(r: dict, pngs: dict[str, bytes], out: Path, size: int) -> str:
    """Write the region's thumbnail file and return its card's HTML."""
    data = render_thumbnail(pngs[r["image_id"]], r.get("mask_rle"), r.get("bbox"),
                            label_color(r.get("label")), size)
    path = out / _thumb_rel(r["region_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    tw, th = struct.unpack(">II", data[16:24])  # PNG IHDR width, height
    return _card({**r, "_th": th, "_tw": tw})


def _page(i: int, n: int, cards: list[str], header: str, title: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)} — page {i} of {n}</title><style>{CSS}</style></head>\n"
            f"<body>{header}{_nav(i, n)}\n<main class=\"grid\">\n" + "\n".join(cards)
            + f"\n</main>\n{_nav(i, n)}</body></html>\n")


def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CorpusError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise CorpusError(f"{out}: folder is not empty and is not a gallery; "
                              "choose an empty or new folder")
        # an earlier gallery: remove exactly what a gallery writes
        shutil.rmtree(out / "thumbs", ignore_errors=True)
        for p in [*out.glob("page-*.html"), out / "index.html", out / MARKER]:
            p.unlink(missing_ok=True)
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text('{"status": "writing"}\n')  # a crashed run can be redone here


def _gallery_rows(corpus: Corpus, where: str | None, limit: int | None,
                  seed: int) -> list[dict]:
    """The card rows (``CARD_COLUMNS`` present in the corpus) matching ``where``, in card order."""
    if limit is not None:
        df = corpus.sample(limit, seed=seed, where=where)
    else:
        df = (corpus.filter(where) if where else corpus.regions_with_images()).collect()
    cols = [c for c in CARD_COLUMNS if c in df.columns]
    df = df.select(cols).sort([k for k in SORT_KEYS if k in cols], nulls_last=True)
    return df.to_dicts()


def _header(corpus: Corpus, rows: list[dict], title: str, where: str | None, limit: int | None,
            seed: int, page_size: int) -> str:
    """The first page's header HTML: title, corpus, counts, filter and label legend."""
    labels = sorted({r.get("label") or "" for r in rows})
    legend = "".join(
        f'<span><i style="background:rgb{label_color(lb)[::-1]}"></i>{_e(lb or "(none)")}</span>'
        for lb in labels)
    return (f"<header><h1>{_e(title)}</h1><p class=\"meta\">corpus {_e(corpus.root.name)} · "
            f"{len(rows)} regions" + (f" (sample of {limit}, seed {seed})" if limit else "")
            + (f" · where <code>{_e(where)}</code>" if where else "")
            + f" · {page_size} per page</p><p class=\"legend\">{legend}</p></header>")


def _next_pass(pages: list[list[dict]], start: int, images_per_pass: int) -> tuple[int, set]:
    """(end page, image ids) of the pass from page ``start``: at most ``images_per_pass`` ids."""
    stop, ids = start, set()
    while stop < len(pages) and (not ids or len(ids | {r["image_id"] for r in pages[stop]})
                                 <= images_per_pass):
        ids |= {r["image_id"] for r in pages[stop]}
        stop += 1
    return stop, ids


def _write_page(out: Path, k: int, pages: list[list[dict]], pngs: dict[str, bytes], header: str,
                title: str, thumb_size: int, workers: int) -> None:
    """None; writes page ``k`` (0-based) and its thumbnails from the pass's ``pngs``."""
    for r in pages[k]:
        if r["image_id"] not in pngs:
            raise CorpusError(f"region {r['region_id']}: image {r['image_id']} "
                              "not in the images table")
    draw = partial(_thumb_card, pngs=pngs, out=out, size=thumb_size)
    with ThreadPoolExecutor(workers) as pool:  # OpenCV releases the GIL
        cards = list(pool.map(draw, pages[k]))
    if not cards:
        cards = ['<p class="meta">No regions match.</p>']
    (out / _page_name(k + 1)).write_text(
        _page(k + 1, len(pages), cards, header if k == 0 else "", title), encoding="utf-8")


def write_gallery(corpus: Corpus, out: str | Path, where: str | None = None,
                  page_size: int = 48, limit: int | None = None, seed: int = 0,
                  thumb_size: int = THUMB_SIZE, title: str = "Region gallery",
                  images_per_pass: int = 2048, workers: int | None = None) -> Path:
    """Write the gallery of regions matching ``where`` (all regions if None; ``limit``: a
    deterministic sample of that many, seed ``seed``) into folder ``out``; returns the path of
    index.html. Cards are ordered by label, series, slice, region_id. Image bytes are read in
    passes over the images files, ``images_per_pass`` distinct images at a time, so memory
    stays bounded for large galleries; thumbnails are drawn on ``workers`` threads (default:
    CPU count). ``out`` must be new, empty, or an earlier gallery."""
    workers = workers or min(8, os.cpu_count() or 1)
    if page_size < 1:
        raise CorpusError(f"page size must be >= 1, got {page_size}")
    out = Path(out)
    rows = _gallery_rows(corpus, where, limit, seed)
    n_pages = max(1, math.ceil(len(rows) / page_size))
    _prepare(out)
    header = _header(corpus, rows, title, where, limit, seed, page_size)
    pages = [rows[k * page_size:(k + 1) * page_size] for k in range(n_pages)]
    start = 0
    while start < n_pages:  # group pages into passes over the images files
        stop, ids = _next_pass(pages, start, images_per_pass)
        pngs = {row["image_id"]: png for row, png in corpus.iter_image_bytes(ids=ids)}
        for k in range(start, stop):
            _write_page(out, k, pages, pngs, header, title, thumb_size, workers)
        start = stop
    (out / MARKER).write_text(json.dumps(
        {"where": where, "limit": limit, "seed": seed, "page_size": page_size,
         "regions": len(rows), "pages": n_pages,
         "files": [_page_name(k + 1) for k in range(n_pages)]}, indent=1) + "\n")
    return out / "index.html"


