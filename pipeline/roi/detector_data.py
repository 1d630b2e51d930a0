"""Corpus tables → an ultralytics (YOLO) detection dataset, and box-level evaluation helpers.

:func:`export_dataset` writes, for rows of the images table and the regions table::

    OUT/images/{train,val,test}/<image_id>.png   the corpus PNG bytes, unchanged
    OUT/labels/{train,val,test}/<image_id>.txt   "class cx cy w h" per region, normalised by
                                                 the image width / height; empty = background
    OUT/data.yaml                                path, train, val, test, names
    OUT/export.json                              counts per split

Splits come from the rows' ``split`` column, which build-corpus assigns per patient; a patient
found in two splits is an error. If the val split is empty, a seeded ``val_fraction`` of the
train *patients* (at least one) is moved from train to val, so val stays patient-disjoint from
train; with a single train patient, train itself is reused as val (val metrics then are
optimistic; a warning is logged). Background images (no region of ``classes``) of the train
and val splits are subsampled (seeded) to at most ``background_ratio`` × the number of positive
images of that split; the test split is always exported complete.

Boxes follow the regions table: ``[x0, y0, x1, y1]`` float pixel coordinates where pixel
(c, r) covers ``[c, c+1) × [r, r+1)``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _file_stem(image_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(image_id))


def _yolo_line(cls: int, bbox, width: int, height: int) -> str | None:
    x0, y0, x1, y1 = (float(v) for v in bbox)
    x0, x1 = max(0.0, min(x0, width)), max(0.0, min(x1, width))
    y0, y1 = max(0.0, min(y0, height)), max(0.0, min(y1, height))
    if x1 <= x0 or y1 <= y0:
        return None
    cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
    return f"{cls} {cx:.6f} {cy:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"


def patient_splits(images: list[dict]) -> dict[str, str]:
    """patient_key → split; raises ValueError if a patient appears in more than one split."""
    seen: dict[str, set[str]] = defaultdict(set)
    for row in images:
        seen[row["patient_key"]].add(row["split"])
    mixed = {p: sorted(s) for p, s in seen.items() if len(s) > 1}
    if mixed:
        raise ValueError(f"patients in more than one split (leakage): {mixed}")
    bad = {s for ss in seen.values() for s in ss} - set(SPLITS)
    if bad:
        raise ValueError(f"unknown split values {sorted(bad)}; expected {SPLITS}")
    return {p: next(iter(s)) for p, s in seen.items()}


def _val_from_train(splits: dict[str, str], fraction: float, rng) -> list[str]:
    train = sorted(p for p, s in splits.items() if s == "train")
    if not train or any(s == "val" for s in splits.values()):
        return []
    if len(train) == 1:
        log.warning("val split empty and only one train patient: reusing train as val")
        return []
    n = min(len(train) - 1, max(1, round(fraction * len(train))))
    moved = sorted(rng.permutation(train)[:n].tolist())
    for p in moved:
        splits[p] = "val"
    log.info("val split empty: moved %d train patient(s) to val", n)
    return moved


def _regions_by_image(regions: list[dict], cls_id: dict[str, int],
                      ids: set[str]) -> dict[str, list[dict]]:
    """image_id → its regions whose label is a class, for the images in ``ids``."""
    regs: dict[str, list[dict]] = defaultdict(list)
    for reg in regions:
        if reg["label"] not in cls_id or reg["image_id"] not in ids:
            continue
        regs[reg["image_id"]].append(reg)
    return regs


def _export_split(out: Path, split: str, rows: list[dict], regs: dict[str, list[dict]],
                  cls_id: dict[str, int], background_ratio: float | None, rng,
                  boxes_per_class: dict[str, int]) -> dict:
    """The counts of ``split`` after writing its images and labels (train boxes are tallied)."""
    pos = [r for r in rows if regs.get(r["image_id"])]
    neg = [r for r in rows if not regs.get(r["image_id"])]
    n_neg = len(neg)
    if split != "test" and background_ratio is not None:
        keep = min(len(neg), int(round(background_ratio * max(len(pos), 1))))
        idx = np.sort(rng.permutation(len(neg))[:keep])
        neg = [neg[i] for i in idx]
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    n_boxes = 0
    for row in pos + neg:
        stem = _file_stem(row["image_id"])
        _write_png(row, out / "images" / split / f"{stem}.png")
        text = []
        for reg in regs.get(row["image_id"], []):
            line = _yolo_line(cls_id[reg["label"]], reg["bbox"], row["width"], row["height"])
            if line is not None:
                text.append(line)
                if split == "train":
                    boxes_per_class[reg["label"]] += 1
        n_boxes += len(text)
        (out / "labels" / split / f"{stem}.txt").write_text("".join(t + "\n" for t in text))
    return {"patients": len({r["patient_key"] for r in rows}), "positive": len(pos),
            "background": len(neg), "background_dropped": n_neg - len(neg), "boxes": n_boxes}


def export_dataset(images: list[dict], regions: list[dict], out: Path, classes: list[str], *,
                   background_ratio: float | None = 1.0, val_fraction: float = 0.1,
                   seed: int = 0) -> Path:
    """Write a YOLO dataset of ``images`` with boxes of ``regions`` whose label is in ``classes``.

    ``images`` rows need image_id, patient_key, split, height, width and image {bytes, path};
    ``regions`` rows need image_id, label and bbox. Class ids follow the order of ``classes``.
    ``background_ratio=None`` keeps every background image. Returns ``out/data.yaml``.
    """
    if not classes:
        raise ValueError("export_dataset: no classes given")
    out = Path(out)
    rng = np.random.default_rng(seed)
    splits = patient_splits(images)
    moved = _val_from_train(splits, val_fraction, rng)
    reuse_train_as_val = not any(s == "val" for s in splits.values())
    cls_id = {name: i for i, name in enumerate(classes)}
    regs = _regions_by_image(regions, cls_id, {row["image_id"] for row in images})
    by_split: dict[str, list[dict]] = defaultdict(list)
    for row in sorted(images, key=lambda r: r["image_id"]):
        by_split[splits[row["patient_key"]]].append(row)

    for sub in ("images", "labels"):
        shutil.rmtree(out / sub, ignore_errors=True)
    boxes_per_class: dict[str, int] = defaultdict(int)
    counts = {split: _export_split(out, split, by_split.get(split, []), regs, cls_id,
                                   background_ratio, rng, boxes_per_class)
              for split in SPLITS}

    data = {"path": str(out.resolve()), "train": "images/train",
            "val": "images/train" if reuse_train_as_val else "images/val",
            "names": dict(enumerate(classes))}
    if counts["test"]["positive"] + counts["test"]["background"]:
        data["test"] = "images/test"
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    summary = {"splits": counts, "classes": list(classes), "train_boxes_per_class":
               dict(boxes_per_class), "val_patients_from_train": moved,
               "train_reused_as_val": reuse_train_as_val, "seed": seed,
               "background_ratio": background_ratio}
    (out / "export.json").write_text(json.dumps(summary, indent=1))
    return out / "data.yaml"


def _write_png(row: dict, dest: Path) -> None:
    img = row.get("image") or {}
    data = img.get("bytes")
    if data is None:
        if not img.get("path"):
            raise ValueError(f"image {row['image_id']}: neither bytes nor path")
        data = Path(img["path"]).read_bytes()
    dest.write_bytes(data)


def truth_size_mm(region: dict, image: dict) -> float:
    """max_diameter_mm of the region, else its box's larger side × pixel spacing; NaN if unknown."""
    d = region.get("max_diameter_mm")
    if d is not None and np.isfinite(d):
        return float(d)
    spacing = image.get("pixel_spacing_mm")  # (row, col) mm
    if not spacing:
        return float("nan")
    x0, y0, x1, y1 = region["bbox"]
    return float(max((x1 - x0) * spacing[1], (y1 - y0) * spacing[0]))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), both XYXY in the same
    pixel frame → (N, M) float64, by ``torchvision.ops.box_iou``; a pair whose union is empty
    (two zero-area boxes) has IoU 0, not NaN."""
    import torch
    from torchvision.ops import box_iou

    ta = torch.from_numpy(np.asarray(a, np.float64).reshape(-1, 4))
    tb = torch.from_numpy(np.asarray(b, np.float64).reshape(-1, 4))
    return box_iou(ta, tb).nan_to_num_(0.0).numpy()


def _match(pred: np.ndarray, true: np.ndarray, thr: float, allowed: np.ndarray | None):
    """Greedy one-to-one matching by descending IoU; returns (true matched, pred matched)."""
    t_hit, p_hit = np.zeros(len(true), bool), np.zeros(len(pred), bool)
    if len(true) == 0 or len(pred) == 0:
        return t_hit, p_hit
    ious = iou_matrix(true, pred)
    if allowed is not None:
        ious = np.where(allowed, ious, 0.0)
    order = np.argsort(-ious, axis=None, kind="stable")
    for flat in order:
        i, j = divmod(int(flat), ious.shape[1])
        if ious[i, j] < thr:
            break
        if not t_hit[i] and not p_hit[j]:
            t_hit[i] = p_hit[j] = True
    return t_hit, p_hit


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _match_images(pred_boxes: list[np.ndarray], true_boxes: list[np.ndarray], iou: float,
                  pred_labels: list[list[str]] | None, true_labels: list[list[str]] | None,
                  true_sizes_mm: list[np.ndarray] | None) -> tuple:
    """(true hit, pred hit, class-aware true hit, class-aware pred hit, true labels, sizes)."""
    aware = pred_labels is not None and true_labels is not None
    t_any, t_cls, p_any, p_cls, labels, sizes = [], [], [], [], [], []
    for k, (pred, true) in enumerate(zip(pred_boxes, true_boxes, strict=True)):
        pred = np.asarray(pred, np.float64).reshape(-1, 4)
        true = np.asarray(true, np.float64).reshape(-1, 4)
        th, ph = _match(pred, true, iou, None)
        t_any.append(th)
        p_any.append(ph)
        tl = list(true_labels[k]) if true_labels is not None else [""] * len(true)
        labels.extend(tl)
        if aware:
            same = np.asarray(tl, object)[:, None] == np.asarray(list(pred_labels[k]), object)[None, :]
            th, ph = _match(pred, true, iou, same.reshape(len(true), len(pred)))
            t_cls.append(th)
            p_cls.append(ph)
        if true_sizes_mm is not None:
            sizes.append(np.asarray(true_sizes_mm[k], np.float64).reshape(-1))
    t_any_a = np.concatenate(t_any) if t_any else np.zeros(0, bool)
    p_any_a = np.concatenate(p_any) if p_any else np.zeros(0, bool)
    t_cls_a = np.concatenate(t_cls) if aware and t_cls else np.zeros(len(t_any_a), bool)
    p_cls_a = np.concatenate(p_cls) if aware and p_cls else np.zeros(len(p_any_a), bool)
    return t_any_a, p_any_a, t_cls_a, p_cls_a, labels, sizes


def box_recall(pred_boxes: list[np.ndarray], true_boxes: list[np.ndarray], iou: float = 0.5, *,
               pred_labels: list[list[str]] | None = None,
               true_labels: list[list[str]] | None = None,
               true_sizes_mm: list[np.ndarray] | None = None,
               size_split_mm: float = 10.0) -> dict:
    """Recall of ground-truth boxes (and precision of predictions) at IoU ≥ ``iou``, per image lists.

    Matching is one-to-one, greedy by descending IoU, within each image. ``recall``/``precision``
    ignore classes; with ``pred_labels`` and ``true_labels`` the ``*_class_aware`` numbers
    only match boxes of the same label, and ``by_class`` gives both per true label. With
    ``true_sizes_mm`` (one diameter per true box) ``by_size`` splits the truths into
    ``ge_<size_split_mm>mm`` and ``lt_<size_split_mm>mm``. Ratios with a zero denominator are None.
    """
    if len(pred_boxes) != len(true_boxes):
        raise ValueError(f"{len(pred_boxes)} prediction lists for {len(true_boxes)} images")
    aware = pred_labels is not None and true_labels is not None
    t_any_a, p_any_a, t_cls_a, p_cls_a, labels, sizes = _match_images(
        pred_boxes, true_boxes, iou, pred_labels, true_labels, true_sizes_mm)
    n_true, n_pred = len(t_any_a), len(p_any_a)
    res: dict = {"iou": iou, "n_true": n_true, "n_pred": n_pred,
                 "tp": int(t_any_a.sum()), "recall": _ratio(int(t_any_a.sum()), n_true),
                 "precision": _ratio(int(p_any_a.sum()), n_pred)}
    if aware:
        res.update(tp_class_aware=int(t_cls_a.sum()),
                   recall_class_aware=_ratio(int(t_cls_a.sum()), n_true),
                   precision_class_aware=_ratio(int(p_cls_a.sum()), n_pred))

    def group(mask: np.ndarray) -> dict:
        g = {"n_true": int(mask.sum()), "recall": _ratio(int(t_any_a[mask].sum()), int(mask.sum()))}
        if aware:
            g["recall_class_aware"] = _ratio(int(t_cls_a[mask].sum()), int(mask.sum()))
        return g

    if true_labels is not None:
        lab = np.asarray(labels, object)
        res["by_class"] = {str(c): group(lab == c) for c in sorted(set(labels))}
    if true_sizes_mm is not None:
        size = np.concatenate(sizes) if sizes else np.zeros(0)
        if len(size) != n_true:
            raise ValueError(f"true_sizes_mm has {len(size)} values for {n_true} true boxes")
        known = np.isfinite(size)
        res["by_size"] = {f"ge_{size_split_mm:g}mm": group(known & (size >= size_split_mm)),
                          f"lt_{size_split_mm:g}mm": group(known & (size < size_split_mm))}
        if not known.all():
            res["by_size"]["unknown"] = group(~known)
    return res
