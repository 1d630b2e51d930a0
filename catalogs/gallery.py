"""Static, paginated HTML gallery of regions.

``write_gallery(corpus, OUT)`` writes one folder::

    OUT/index.html          page 1
    OUT/page-002.html ...   further pages, ``page_size`` cards each, prev/next links
    OUT/thumbs/ab/<region_id>.png        the region's image, mask and box (one per region)
    OUT/thumbs/ab/<region_id>-zoom.png   a zoomed crop around a small region
    OUT/gallery.json        what was rendered (marks the folder as a gallery)

Pages are rendered by jinja2 from ``catalogs/templates/`` (autoescaped). Every page carries the
header: corpus, counts, a legend with one colour per label (a fixed qualitative palette in
sorted label order, so ten labels get ten colours), and filters (label, modality, split,
source, size) in a few lines of plain JavaScript. Cards form a dense grid, labels mixed by
default: round-robin over labels, then over modality, source and series within a label. A card
shows the image with the mask overlaid (semi-transparent label colour and its outline) and the
box (yellow, on the pixel edges of ``bbox``); a region whose box is small beside the image
also gets a zoomed crop next to it. One line of text per card; a click opens the details
(caption, negatives, box, area, ids). The same corpus and arguments give byte-identical files
(stable order, no timestamps, deterministic PNG encoding). Nothing loads from the network.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import struct
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import cv2
import jinja2
import numpy as np
from pycocotools import mask as mask_utils

from .corpus import Corpus, CorpusError
from .verify import decode_png

THUMB_SIZE = 160
ALPHA = 0.45
BOX_BGR = (0, 230, 255)  # yellow
# Label colours, RGB hex: Trubetskoy's 20 distinct colours in his order (most distinct first)
# without yellow and beige (the box), grey, white, black and navy (lost on grey-scale images).
# Label i of the sorted labels gets PALETTE[i % 16]: neighbours in the list differ clearly.
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3",
           "#808000", "#ffd8b1")
ORDERS = ("mixed", "label")
MIX_KEYS = ("label", "modality", "source", "series_key")  # round-robin levels of "mixed"
SORT_KEYS = ("label", "series_key", "slice_index", "region_id")
FACETS = ("label", "modality", "split", "source", "size")
# Size classes by maximal diameter (10 mm: the usual lesion-size threshold).
SIZES = (("lt10", "< 10 mm"), ("10to30", "10–30 mm"), ("ge30", "≥ 30 mm"), ("na", "unknown"))
ZOOM_WINDOW = 1 / 3  # zoom when the crop window is at most this fraction of the image's side
MIN_WINDOW_PX = 24  # smallest crop window side, image pixels
CARD_COLUMNS = ("region_id", "image_id", "series_key", "patient_key", "split", "modality",
                "plane", "slice_index", "window", "label", "laterality", "source", "segmenter",
                "score", "bbox", "mask_rle", "area_px", "area_mm2", "max_diameter_mm",
                "caption_region", "negatives", "negative_kinds", "caption_summary",
                "caption_report", "height", "width")
MARKER = "gallery.json"
TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("catalogs", "templates"),
                               autoescape=True, trim_blocks=True, lstrip_blocks=True,
                               keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


# -- colours and order ---------------------------------------------------------------------------

def _label_key(label: str | None) -> tuple[bool, str]:
    return (label is None, label or "")


def label_colors(labels) -> dict[str | None, tuple[int, int, int]]:
    """{label: BGR colour}: the distinct labels in sorted order (None last) take the
    palette's colours in turn (a fixed assignment, not a hash)."""
    out = {}
    for i, label in enumerate(sorted(set(labels), key=_label_key)):
        rgb = PALETTE[i % len(PALETTE)]
        out[label] = (int(rgb[5:7], 16), int(rgb[3:5], 16), int(rgb[1:3], 16))
    return out


def _hex(bgr: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*bgr[::-1])


def mix(rows: list[dict], keys: Sequence[str] = MIX_KEYS) -> list[dict]:
    """``rows`` reordered round-robin over the groups of ``keys[0]`` (groups in sorted
    order), each group first mixed the same way by the remaining keys; the order inside the
    last level is kept. Same rows in, same order out."""
    if not keys or len(rows) < 2:
        return list(rows)
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get(keys[0]), []).append(r)
    mixed = [mix(groups[k], keys[1:]) for k in sorted(groups, key=_label_key)]
    gap = object()
    return [r for turn in itertools.zip_longest(*mixed, fillvalue=gap) for r in turn
            if r is not gap]


def size_class(r: dict) -> str:
    """Key of the row's size class in :data:`SIZES`, from ``max_diameter_mm``."""
    d = r.get("max_diameter_mm")
    if d is None or not math.isfinite(d):
        return "na"
    return "lt10" if d < 10 else "10to30" if d < 30 else "ge30"


# -- thumbnails ----------------------------------------------------------------------------------

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


def zoom_window(bbox: Sequence[float] | None, shape: tuple[int, int]) -> tuple | None:
    """The square crop window ``(x0, y0, x1, y1)`` (integer pixel edges, inside the image)
    centred on a small box: side twice the box's longer side, at least ``MIN_WINDOW_PX``;
    None when the box is missing or the window would exceed ``ZOOM_WINDOW`` of the image."""
    if bbox is None or len(bbox) != 4 or any(v is None for v in bbox):
        return None
    h, w = shape
    x0, y0, x1, y1 = (float(v) for v in bbox)
    side = math.ceil(max(2 * max(x1 - x0, y1 - y0), MIN_WINDOW_PX))
    if side > ZOOM_WINDOW * max(h, w) or side > min(h, w):
        return None
    wx = min(max(math.floor((x0 + x1 - side) / 2), 0), w - side)
    wy = min(max(math.floor((y0 + y1 - side) / 2), 0), h - side)
    return (wx, wy, wx + side, wy + side)


def render_thumbnail(png: bytes, rle: dict | None, bbox: Sequence[float] | None,
                     color: tuple[int, int, int], size: int = THUMB_SIZE,
                     window: Sequence[int] | None = None) -> bytes:
    """PNG bytes: the image (or its ``window`` (x0, y0, x1, y1), integer pixel edges) scaled
    so its longer side is ``size``, the mask blended in BGR ``color`` (alpha 0.45) with its
    outline, and the box drawn on the scaled pixel edges (bbox [x0, y0, x1, y1] in image
    pixels: pixel (c, r) covers [c, c+1) × [r, r+1))."""
    gray = np.clip(decode_png(png), 0, 255).astype(np.uint8)
    mask = None
    if rle is not None and rle.get("counts") is not None:
        mask = _decode_mask(rle, gray.shape)
    if window is not None:
        x0, y0, x1, y1 = (int(v) for v in window)
        gray = gray[y0:y1, x0:x1]
        mask = None if mask is None else mask[y0:y1, x0:x1]
        if bbox is not None:
            bbox = [float(bbox[0]) - x0, float(bbox[1]) - y0, float(bbox[2]) - x0,
                    float(bbox[3]) - y0]
    return _overlay(gray, mask, bbox, color, size)


def _overlay(gray: np.ndarray, mask: np.ndarray | None, bbox, color, size: int) -> bytes:
    h, w = gray.shape
    s = size / max(h, w)
    tw, th = max(1, round(w * s)), max(1, round(h * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    out = cv2.cvtColor(cv2.resize(gray, (tw, th), interpolation=interp), cv2.COLOR_GRAY2BGR)
    if mask is not None:
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


def _thumb_rel(region_id: str, suffix: str = "") -> str:
    return f"thumbs/{region_id[:2]}/{region_id}{suffix}.png"


def _write_png(out: Path, rel: str, data: bytes) -> dict:
    """Write ``data`` at ``out/rel``; ``{"src", "w", "h"}`` for the <img> tag."""
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    w, h = struct.unpack(">II", data[16:24])  # PNG IHDR width, height
    return {"src": rel, "w": w, "h": h}


def _draw(r: dict, pngs: dict[str, bytes], out: Path, size: int, colors: dict) -> dict:
    """Write the region's thumbnail (and zoomed crop) files; the card's template values."""
    png, color = pngs[r["image_id"]], colors[r.get("label")]
    thumb = _write_png(out, _thumb_rel(r["region_id"]),
                       render_thumbnail(png, r.get("mask_rle"), r.get("bbox"), color, size))
    zoom = None
    if r.get("height") and r.get("width"):
        window = zoom_window(r.get("bbox"), (int(r["height"]), int(r["width"])))
        if window is not None:
            data = render_thumbnail(png, r.get("mask_rle"), r.get("bbox"), color, size, window)
            zoom = _write_png(out, _thumb_rel(r["region_id"], "-zoom"), data)
            zoom["factor"] = f"{zoom['w'] / (window[2] - window[0]) * r['width'] / thumb['w']:.0f}"
    return card_values(r, thumb, zoom, _hex(color))


# -- card and page values ------------------------------------------------------------------------

def _num(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _text(value) -> str:
    return "" if value is None else str(value)


def _details(r: dict) -> list[tuple[str, str]]:
    """(name, text) rows of a card's details, those the row has."""
    bbox = r.get("bbox")
    box = ("[" + ", ".join(_num(v) for v in bbox) + "] px" if bbox is not None
           and len(bbox) == 4 and all(v is not None for v in bbox) else None)
    where = " · ".join(str(v) for v in (r.get("split"), r.get("modality"), r.get("plane"))
                       if v is not None)
    if r.get("slice_index") is not None:
        where += f" · slice {r['slice_index']}"
    if r.get("window"):
        where += f" · window {r['window']}"
    source = _text(r.get("source")) or "–"
    if r.get("segmenter") and r.get("segmenter") != r.get("source"):
        source += f" / {r['segmenter']}"
    if r.get("score") is not None:
        source += f" · score {_num(r['score'], 3)}"
    rows = [("caption", r.get("caption_region")), ("image", where), ("box", box),
            ("area", f"{_num(r.get('area_mm2'))} mm² ({_text(r.get('area_px')) or '–'} px)"),
            ("max ⌀", f"{_num(r.get('max_diameter_mm'))} mm"), ("source", source),
            ("image summary", r.get("caption_summary")), ("report", r.get("caption_report"))]
    return [(k, str(v)) for k, v in rows if v]


def _negatives(r: dict) -> list[tuple[str, str]]:
    negatives = r.get("negatives")
    if isinstance(negatives, str):
        negatives = [negatives]
    kinds = r.get("negative_kinds")
    if not (isinstance(kinds, list) and negatives and len(kinds) == len(negatives)):
        kinds = [None] * len(negatives or [])
    return [(str(n), _text(k)) for n, k in zip(negatives or [], kinds, strict=True)
            if n is not None]


def card_values(r: dict, thumb: dict, zoom: dict | None, color: str) -> dict:
    """What the template shows of one region row (plain strings; the template escapes)."""
    lat = r.get("laterality")
    d = r.get("max_diameter_mm")
    short = f"⌀ {_num(d)} mm" if d is not None else f"{_num(r.get('area_mm2'))} mm²"
    return {"region_id": r["region_id"], "image_id": _text(r.get("image_id")),
            "label": _text(r.get("label")), "label_text": r.get("label") or "(no label)",
            "laterality": lat if lat and lat != "none" else "", "color": color,
            "modality": _text(r.get("modality")), "split": _text(r.get("split")),
            "source": _text(r.get("source")), "size": size_class(r), "short": short,
            "thumb": thumb, "zoom": zoom, "details": _details(r), "negatives": _negatives(r)}


def _facets(rows: list[dict]) -> list[dict]:
    """Filter menus: for each facet, its values over all the gallery's rows with counts."""
    out = []
    for name in FACETS:
        if name == "size":
            n = Counter(size_class(r) for r in rows)
            options = [{"value": k, "text": t, "n": n[k]} for k, t in SIZES if n[k]]
        else:
            n = Counter(_text(r.get(name)) for r in rows)
            options = [{"value": v, "text": v or "(none)", "n": n[v]} for v in sorted(n)]
        out.append({"name": name, "options": options})
    return out


def _page_name(i: int) -> str:
    """Page 1 is index.html, page i > 1 is page-00i.html."""
    return "index.html" if i == 1 else f"page-{i:03d}.html"


def _page_values(i: int, n: int) -> dict:
    window = range(max(1, i - 5), min(n, i + 5) + 1)
    return {"page": i, "pages": n, "prev": _page_name(i - 1) if i > 1 else None,
            "next": _page_name(i + 1) if i < n else None,
            "links": [(k, _page_name(k)) for k in window]}


def _header(corpus: Corpus, rows: list[dict], colors: dict, **shown) -> dict:
    """Template values shared by every page: title, counts, legend, filters."""
    n = Counter(r.get("label") for r in rows)
    legend = [{"value": _text(lb), "text": lb or "(no label)", "n": n[lb], "color": _hex(c)}
              for lb, c in colors.items() if n[lb]]
    order = {"mixed": "labels mixed (round-robin)", "label": "ordered by label"}[shown["order"]]
    return {**shown, "corpus": corpus.root.name, "n_regions": len(rows), "legend": legend,
            "facets": _facets(rows), "order_text": order,
            "cell": shown["thumb_size"] + 10}


# -- writing -------------------------------------------------------------------------------------

def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CorpusError("gallery folder: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise CorpusError("gallery folder is not empty and is not a gallery; "
                              "choose an empty or new folder")
        # an earlier gallery: remove exactly what a gallery writes
        shutil.rmtree(out / "thumbs", ignore_errors=True)
        for p in [*out.glob("page-*.html"), out / "index.html", out / MARKER]:
            p.unlink(missing_ok=True)
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text('{"status": "writing"}\n')  # a crashed run can be redone here


def _gallery_rows(corpus: Corpus, where: str | None, limit: int | None, seed: int,
                  order: str) -> list[dict]:
    """The card rows (``CARD_COLUMNS`` present in the corpus) matching ``where``, in card
    order: sorted by ``SORT_KEYS``, then (``order="mixed"``) mixed by :func:`mix`."""
    if limit is not None:
        df = corpus.sample(limit, seed=seed, where=where)
    else:
        df = (corpus.filter(where) if where else corpus.regions_with_images()).collect()
    cols = [c for c in CARD_COLUMNS if c in df.columns]
    rows = df.select(cols).sort([k for k in SORT_KEYS if k in cols], nulls_last=True).to_dicts()
    return mix(rows) if order == "mixed" else rows


def _next_pass(pages: list[list[dict]], start: int, images_per_pass: int) -> tuple[int, set]:
    """(end page, image ids) of the pass from page ``start``: at most ``images_per_pass`` ids."""
    stop, ids = start, set()
    while stop < len(pages) and (not ids or len(ids | {r["image_id"] for r in pages[stop]})
                                 <= images_per_pass):
        ids |= {r["image_id"] for r in pages[stop]}
        stop += 1
    return stop, ids


def _write_page(out: Path, k: int, pages: list[list[dict]], pngs: dict[str, bytes],
                header: dict, colors: dict, workers: int) -> None:
    """None; writes page ``k`` (0-based) and its thumbnails from the pass's ``pngs``."""
    for r in pages[k]:
        if r["image_id"] not in pngs:
            raise CorpusError(f"region {r['region_id']}: its image is not in the images table")
    draw = partial(_draw, pngs=pngs, out=out, size=header["thumb_size"], colors=colors)
    with ThreadPoolExecutor(workers) as pool:  # OpenCV releases the GIL
        cards = list(pool.map(draw, pages[k]))
    page = TEMPLATES.get_template("gallery.html.j2").render(
        **header, **_page_values(k + 1, len(pages)), cards=cards)
    (out / _page_name(k + 1)).write_text(page, encoding="utf-8")


def write_gallery(corpus: Corpus, out: str | Path, where: str | None = None,
                  page_size: int = 48, limit: int | None = None, seed: int = 0,
                  thumb_size: int = THUMB_SIZE, title: str = "Region gallery",
                  images_per_pass: int = 2048, workers: int | None = None,
                  order: str = "mixed") -> Path:
    """Write the gallery of regions matching ``where`` (all regions if None; ``limit``: a
    deterministic sample of that many, seed ``seed``) into folder ``out``; returns the path of
    index.html. ``order``: ``"mixed"`` (labels round-robin, see :func:`mix`) or ``"label"``
    (label, series, slice, region_id). Label colours follow the sorted labels of the whole
    corpus, so a label keeps its colour whatever ``where`` selects. Image bytes are read in
    passes over the images files, ``images_per_pass`` distinct images at a time, so memory
    stays bounded for large galleries; thumbnails are drawn on ``workers`` threads (default:
    CPU count). ``out`` must be new, empty, or an earlier gallery."""
    workers = workers or min(8, os.cpu_count() or 1)
    if page_size < 1:
        raise CorpusError(f"page size must be >= 1, got {page_size}")
    if order not in ORDERS:
        raise CorpusError(f"order must be one of {ORDERS}")
    out = Path(out)
    rows = _gallery_rows(corpus, where, limit, seed, order)
    colors = label_colors(corpus.regions().select("label").unique().collect()["label"])
    n_pages = max(1, math.ceil(len(rows) / page_size))
    _prepare(out)
    header = _header(corpus, rows, colors, title=title, where=where, limit=limit, seed=seed,
                     page_size=page_size, order=order, thumb_size=thumb_size)
    pages = [rows[k * page_size:(k + 1) * page_size] for k in range(n_pages)]
    start = 0
    while start < n_pages:  # group pages into passes over the images files
        stop, ids = _next_pass(pages, start, images_per_pass)
        pngs = {row["image_id"]: png for row, png in corpus.iter_image_bytes(ids=ids)}
        for k in range(start, stop):
            _write_page(out, k, pages, pngs, header, colors, workers)
        start = stop
    (out / MARKER).write_text(json.dumps(
        {"where": where, "limit": limit, "seed": seed, "page_size": page_size, "order": order,
         "regions": len(rows), "pages": n_pages,
         "files": [_page_name(k + 1) for k in range(n_pages)]}, indent=1) + "\n")
    return out / "index.html"
