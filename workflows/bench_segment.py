"""python -m workflows.bench_segment [--patients 6] [--out docs-snippet.md] → box-prompt Dice + CPU timings.
python -m workflows.bench_segment --stage-proxy [--images 64] [--encoder-batch 16] → model-actor CPU.

Dice of box-prompted masks against label masks for LiteMedSAM and the Otsu baseline
(:mod:`pipeline.roi.segment`) on

(a) held-out phantom CT slices: ``make_phantoms`` into a temp dir, each series read with
    ``read_volume``, its ``CT_n_seg.nii.gz`` with ``read_nifti_labels``, cut with ``cut_images``
    (soft-tissue window, labelled slices, every ``--slice-step``-th of them);
(b) the MNI152 2009a T1 bundled with nilearn (1 mm, read with nibabel, no download) with a
    label map from nilearn's bundled GM/WM probability maps (GM = 1 where gm > 0.5,
    WM = 2 where wm > 0.5, WM wins), axial slices 0, 8, 16, ...

On every slice each label's 4-connected components of >= ``--min-px`` pixels (label "body"
ignored) are prompts: box = the component's tight XYXY edge box, truth = the component mask.
Dice is averaged per group (phantom organs vs lesions; MNI WM vs GM). LiteMedSAM's CPU cost is
timed on one 512×512 slice: image encoder ms per image, and decoder (prompt encoder + mask
decoder + paste-back) ms per box from the difference between 1 and 16 boxes. Prints a markdown
table and a JSON record; ``--out`` also writes the table to a file.

``--stage-proxy``: the model actor's own CPU cost, without a GPU. Phantom CT at 512² cut as a
``--roi labels,boxes`` build cuts it (every labelled slice, soft-tissue window), the images'
model inputs made as the CPU actors make them (:func:`pipeline.roi.propose.model_inputs`),
then :class:`pipeline.roi.propose.ModelStage` with LiteMedSAM's geometry and instantly
returning modules (a zero embedding; a box-shaped low-res mask per prompt). Process CPU time of
the stage call minus the segmenter's device work (upload, resize/normalise/pad, the modules,
paste-back, threshold, bit-packing: GPU work on a GPU), plus pickling its answer and unpickling
its input (what Ray's transfer costs the actor at most), per image: ``actor_cpu_ms_per_image``;
and ``encoder_images_per_call``. Prints one JSON record.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from pipeline.images.png import decode_png_bytes
from pipeline.images.slicing import SliceConfig, cut_images
from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.read import read_volume
from pipeline.ingest.volume import Volume
from pipeline.labels.nifti import label_names_from_json, read_nifti_labels
from pipeline.phantoms.anatomy import LESION_HOSTS
from pipeline.phantoms.studies import make_phantoms
from pipeline.roi.segment import Segmenter, build_segmenter, mask_to_box

MNI_NAMES = {1: "gm", 2: "wm"}
# Pseudonyms are irrelevant here; a fixed key keeps read_volume from creating a key file.
BENCH_DEID = Deidentifier(b"bench-segment-key-not-secret-0123")


def mni_volume() -> Volume:
    """The nilearn-bundled MNI152 T1 (197, 233, 189) 1 mm RAS+ with labels 1 = GM, 2 = WM."""
    data = Path(importlib.util.find_spec("nilearn").origin).parent / "datasets" / "data"

    def load(kind: str):
        return nib.load(data / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")

    t1 = load("t1")
    gm, wm = (np.asarray(load(k).dataobj, dtype=np.float32) / 255.0 for k in ("gm", "wm"))
    labels = np.zeros(gm.shape, dtype=np.int32)
    labels[gm > 0.5] = 1
    labels[wm > 0.5] = 2
    array = np.asarray(t1.dataobj, dtype=np.float32)
    return Volume(array, t1.affine.astype(np.float64), "MR", labels=labels, label_names=MNI_NAMES)


def log(message: str) -> None:
    """Progress on stderr (stdout carries the table and JSON)."""
    print(f"[bench_segment] {message}", file=sys.stderr, flush=True)


def decode_png(png: bytes) -> np.ndarray:
    """(H, W) uint8/uint16 pixels of a grey PNG."""
    return decode_png_bytes(png)


def components(labels: np.ndarray, names: dict[int, str], min_px: int = 20) -> list:
    """[(label name, (H, W) bool component)] of every label but "body", >= ``min_px`` pixels."""
    out = []
    for value in np.unique(labels):
        name = names.get(int(value), f"label_{value}")
        if value == 0 or name == "body":
            continue
        cc, n = ndimage.label(labels == value)
        sizes = np.bincount(cc.ravel())
        out.extend((name, cc == c) for c in range(1, n + 1) if sizes[c] >= min_px)
    return out


def slice_cases(images, names: dict[int, str], min_px: int) -> list[dict]:
    """One case per slice with prompts: image (H, W), boxes (N, 4), truths (N, H, W), names."""
    cases = []
    for im in images:
        comps = components(im.labels, names, min_px)
        if comps:
            truths = np.stack([m for _, m in comps])
            cases.append(
                {
                    "image": decode_png(im.png),
                    "boxes": np.stack([mask_to_box(m) for m in truths]),
                    "truths": truths,
                    "names": [n for n, _ in comps],
                }
            )
    return cases


def phantom_cases(patients: int, seed: int, slice_step: int, min_px: int) -> list[dict]:
    """Cases from freshly generated phantoms (soft-tissue window, every slice_step-th labelled)."""
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench_segment_") as tmp:
        for folder in make_phantoms(Path(tmp), patients=patients, seed=seed):
            for seg in sorted(folder.glob("CT_*_seg.nii.gz")):
                series = folder / seg.name.removesuffix("_seg.nii.gz")
                vol = read_volume(series, BENCH_DEID)
                names = label_names_from_json(seg.with_name(seg.name.replace(".nii.gz", ".json")))
                vol.labels, vol.label_names = read_nifti_labels(seg, vol, names)
                images = cut_images(vol, SliceConfig(every_k=0, ct_windows=("soft_tissue",)))
                chosen = images[::slice_step]
                cases.extend(slice_cases(chosen, vol.label_names, min_px))
    return cases


def mni_cases(step: int, min_px: int) -> list[dict]:
    """Cases from MNI axial slices 0, step, 2·step, ... that carry GM/WM labels."""
    images = cut_images(mni_volume(), SliceConfig(every_k=0))
    return slice_cases([im for im in images if im.slice_index % step == 0], MNI_NAMES, min_px)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A| + |B|) of two (H, W) bool masks (1.0 when both are empty)."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(pred, truth).sum()) / total


def score(seg: Segmenter, cases: list[dict], group) -> dict[str, list[float]]:
    """Dice per group name → list, over every prompt of every case."""
    out: dict[str, list[float]] = {}
    results = seg.predict_batch([c["image"] for c in cases], [c["boxes"] for c in cases])
    for case, (masks, _) in zip(cases, results, strict=True):
        for name, pred, truth in zip(case["names"], masks, case["truths"], strict=True):
            out.setdefault(group(name), []).append(dice(pred, truth))
    return out


def phantom_group(name: str) -> str:
    return "lesions" if name in LESION_HOSTS else "organs"


def _best(fn, repeats: int) -> tuple[float, float]:
    """(min, median) seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.min(times)), float(np.median(times))


def time_lite(seg, image: np.ndarray, repeats: int = 5) -> dict:
    """ms for LiteMedSAM on one image: encoder per image, decoder for 1 and 16 boxes.

    Decoder = prompt encoder + mask decoder + paste-back + threshold; per-box = (t16 − t1) / 15.
    Best-of-``repeats`` (min) is the headline (robust to other load on a shared machine);
    medians are reported alongside.
    """
    x = seg.preprocess(image)[None]
    emb = seg.encode(x)
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    xy0 = rng.uniform(0, 0.6, (16, 2)) * [w, h]
    boxes = np.concatenate([xy0, xy0 + rng.uniform(0.1, 0.4, (16, 2)) * [w, h]], 1)
    boxes = boxes.astype(np.float32)
    enc = _best(lambda: seg.encode(x), repeats)
    dec = {n: _best(lambda n=n: seg.decode(emb, boxes[:n], (h, w)), repeats) for n in (1, 16)}
    return {
        "encoder_ms_per_image": 1000 * enc[0],
        "decoder_ms_1_box": 1000 * dec[1][0],
        "decoder_ms_16_boxes": 1000 * dec[16][0],
        "decoder_ms_per_box": 1000 * (dec[16][0] - dec[1][0]) / 15,
        "median_ms": {
            "encoder": 1000 * enc[1],
            "decoder_1_box": 1000 * dec[1][1],
            "decoder_16_boxes": 1000 * dec[16][1],
        },
        "repeats": repeats,
        "image_size": [h, w],
    }


def cpu_name() -> str:
    """The CPU as "x86_64, N cores, <model name>", from platform and /proc/cpuinfo (when readable)."""
    name = ""
    try:
        with open("/proc/cpuinfo") as fh:
            name = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    return ", ".join(x for x in (platform.machine(), f"{os.cpu_count()} cores", name) if x)


def summarise(per_seg: dict) -> dict:
    """{dataset: {group: {segmenter: {"dice": mean, "n": count}}}}."""
    out: dict = {}
    for seg_name, datasets in per_seg.items():
        for dataset, groups in datasets.items():
            for group, values in groups.items():
                cell = {"dice": round(float(np.mean(values)), 4), "n": len(values)}
                out.setdefault(dataset, {}).setdefault(group, {})[seg_name] = cell
    return out


def markdown(summary: dict, timing: dict) -> str:
    lines = ["| dataset | group | prompts | LiteMedSAM Dice | Otsu Dice |", "|---|---|---|---|---|"]
    for dataset, groups in summary.items():
        for group, cells in sorted(groups.items()):
            lite, otsu = cells["lite-medsam"], cells["otsu"]
            lines.append(
                f"| {dataset} | {group} | {lite['n']} | {lite['dice']:.3f} | {otsu['dice']:.3f} |"
            )
    lines.append("")
    lines.append(
        f"LiteMedSAM CPU ({timing['threads']} threads, {timing['machine']}): image encoder "
        f"{timing['encoder_ms_per_image']:.0f} ms/image (256×256 model input), decoder + "
        f"paste-back to {timing['image_size'][0]}×{timing['image_size'][1]} "
        f"{timing['decoder_ms_1_box']:.0f} ms for 1 box, "
        f"{timing['decoder_ms_per_box']:.1f} ms per extra box (1 vs 16 boxes); best of "
        f"{timing['repeats']}."
    )
    return "\n".join(lines) + "\n"


def timing_record(lite) -> dict:
    """LiteMedSAM timings on MNI axial slice 96 resized to 512×512, plus thread/CPU facts."""
    images = cut_images(mni_volume(), SliceConfig(every_k=0))
    image = decode_png(next(im for im in images if im.slice_index == 96).png)
    log("timing LiteMedSAM encoder and decoder")
    timing = time_lite(lite, cv2.resize(image, (512, 512), interpolation=cv2.INTER_LINEAR))
    timing.update(threads=torch.get_num_threads(), machine=cpu_name())
    return timing


class _InstantEncoder(torch.nn.Module):
    """(B, 3, 256, 256) → (B, 256, 64, 64) zeros: an encoder that costs nothing."""

    def forward(self, x):
        return x.new_zeros((x.shape[0], 256, 64, 64))


class _BoxPrompts(torch.nn.Module):
    """Keeps the prompt boxes for :class:`_BoxMasks`; ``get_dense_pe`` for the decoder call."""

    def forward(self, points, boxes, masks):
        return boxes, None

    def get_dense_pe(self):
        return None


class _BoxMasks(torch.nn.Module):
    """Low-res (N, 1, 256, 256) logits: +1 inside each model-frame box, −1 outside; IoU 0.9."""

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                dense_prompt_embeddings, multimask_output):
        boxes = sparse_prompt_embeddings + 0.5
        grid = torch.arange(256, dtype=torch.float32) + 0.5
        inside_x = (grid >= boxes[:, None, 0]) & (grid <= boxes[:, None, 2])
        inside_y = (grid >= boxes[:, None, 1]) & (grid <= boxes[:, None, 3])
        logits = (inside_y[:, :, None] & inside_x[:, None, :]).float() * 2 - 1
        return logits[:, None], torch.full((boxes.shape[0], 1), 0.9)


def proxy_rows(seed: int, images: int) -> tuple[list[dict], dict]:
    """Image rows (512² PNGs) with prompts, as a labels,boxes build cuts a phantom patient."""
    from pipeline.roi.regions import RegionConfig, label_prompts

    cfg = RegionConfig(routes=("labels", "boxes"))
    rows, prompts = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_proxy_") as tmp:
        folder = make_phantoms(Path(tmp), patients=1, seed=seed, matrix=512)[0]
        seg = sorted(folder.glob("CT_*_seg.nii.gz"))[0]
        vol = read_volume(folder / seg.name.removesuffix("_seg.nii.gz"), BENCH_DEID)
        names = label_names_from_json(seg.with_name(seg.name.replace(".nii.gz", ".json")))
        vol.labels, vol.label_names = read_nifti_labels(seg, vol, names)
        cut = cut_images(vol, SliceConfig(every_k=0, ct_windows=("soft_tissue",)))
    for k, im in enumerate(cut):
        row = {"image_id": f"proxy{k}", "pixel_to_ras": np.asarray(im.pixel_to_ras).ravel(),
               "pixel_spacing_mm": list(im.pixel_spacing_mm), "image": {"bytes": im.png}}
        found = label_prompts(row, im.labels, vol.label_names, cfg) if im.labels is not None else []
        if found:
            rows.append(row)
            prompts[row["image_id"]] = found
    reps = -(-images // max(1, len(rows)))  # repeat the slices up to ``images``
    rows = [{**r, "image_id": f"{r['image_id']}-{i}"} for i in range(reps) for r in rows][:images]
    return rows, {r["image_id"]: prompts[r["image_id"].rsplit("-", 1)[0]] for r in rows}


def stage_proxy(seed: int, images: int, encoder_batch: int) -> dict:
    """The model actor's CPU outside device work, per image (see the module doc)."""
    import pickle

    from pipeline.roi.propose import ModelStage, model_inputs
    from pipeline.roi.regions import RegionConfig
    from pipeline.roi.segment import PromptSegmenter
    from pipeline.roi.segment_models import ModelParts

    cfg = RegionConfig(routes=("labels", "boxes"), segmenter="otsu", encoder_batch=encoder_batch)
    rows, prompts = proxy_rows(seed, images)
    inputs = model_inputs(rows, prompts, cfg)
    stage = ModelStage(cfg)
    parts = ModelParts("lite-medsam-proxy", _InstantEncoder(), _BoxPrompts(), _BoxMasks(), 256,
                       "minmax", None)
    stage.segmenter = PromptSegmenter(parts, batch_size=encoder_batch)
    stage(inputs[:encoder_batch])  # warm-up
    stage.segmenter.device_s = 0.0
    blob = pickle.dumps(inputs, protocol=5)
    t = time.process_time()
    received = pickle.loads(blob)
    out = stage(received)
    sent = pickle.dumps(out, protocol=5)
    total = time.process_time() - t
    device = stage.segmenter.device_s
    n = len(inputs)
    return {
        "bench": "segment-stage-proxy", "images": n, "image_size": list(inputs[0].pixels.shape),
        "boxes_per_image": round(sum(len(x.prompts) for x in inputs) / n, 2),
        "encoder_batch": encoder_batch,
        "encoder_images_per_call": round(out.encoded_images / max(1, out.encoder_calls), 2),
        "actor_cpu_ms_per_image": round(1000 * (total - device) / n, 3),
        "device_work_cpu_ms_per_image": round(1000 * device / n, 3),
        "transfer_bytes_per_image": round((len(blob) + len(sent)) / n),
        "threads": torch.get_num_threads(), "machine": cpu_name(),
    }


def run(patients, seed, slice_step, mni_step, min_px, timing_only=False) -> dict:
    t0 = time.perf_counter()
    lite, otsu = build_segmenter("lite-medsam"), build_segmenter("otsu")
    per_seg: dict = {}
    slices: dict = {}
    if not timing_only:
        datasets = {
            "phantom": (phantom_cases(patients, seed, slice_step, min_px), phantom_group),
            "mni152": (mni_cases(mni_step, min_px), lambda name: name),
        }
        for seg in (lite, otsu):
            for key, (cases, group) in datasets.items():
                log(f"{seg.name} on {len(cases)} {key} slices")
                per_seg.setdefault(seg.name, {})[key] = score(seg, cases, group)
        slices = {k: len(c) for k, (c, _) in datasets.items()}
    record = {
        "bench": "segment",
        "patients": patients,
        "seed": seed,
        "slice_step": slice_step,
        "mni_step": mni_step,
        "min_px": min_px,
        "slices": slices,
        "checkpoint_sha256": lite.checkpoint_sha256,
        "dice": summarise(per_seg),
        "timing": timing_record(lite),
    }
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slice-step", type=int, default=2, help="every n-th labelled phantom slice")
    ap.add_argument("--mni-step", type=int, default=8, help="MNI axial slices 0, n, 2n, ...")
    ap.add_argument("--min-px", type=int, default=20, help="smallest component prompted")
    ap.add_argument("--timing-only", action="store_true", help="skip the Dice part")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--stage-proxy", action="store_true",
                    help="measure the model actor's own CPU per image instead (JSON)")
    ap.add_argument("--images", type=int, default=64, help="--stage-proxy: images")
    ap.add_argument("--encoder-batch", type=int, default=16, help="--stage-proxy: batch")
    args = ap.parse_args(argv)
    if args.stage_proxy:
        if args.images < 1 or not 1 <= args.encoder_batch <= 256:
            raise SystemExit("--images must be >= 1 and --encoder-batch in [1, 256]")
        print(json.dumps(stage_proxy(args.seed, args.images, args.encoder_batch), indent=2))
        return 0
    record = run(
        args.patients, args.seed, args.slice_step, args.mni_step, args.min_px, args.timing_only
    )
    table = markdown(record["dice"], record["timing"])
    print(table)
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
