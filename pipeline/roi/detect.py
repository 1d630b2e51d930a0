"""Lesion detector stage: a trained ultralytics YOLO checkpoint run offline on 2D images.

Every import of ultralytics goes through :func:`ultralytics_offline`, which makes the library
unable to reach the network (``YOLO_OFFLINE=1``, hub/sync/telemetry off, fonts looked up
locally only), keeps its settings in a project-local folder and gives torch back the CPUs this
process was granted (:func:`granted_cpus`; ultralytics pins ``OMP_NUM_THREADS=1`` on import and
``cpu_count() - 1`` threads each time it selects a CPU device).

Boxes are XYXY float32 in pixel coordinates of the input image, where pixel (column c, row r)
covers ``[c, c+1) x [r, r+1)`` (the convention of ``bbox`` in the regions table). ultralytics
letterboxes each image to ``imgsz`` and maps boxes back with ``ultralytics.utils.ops.scale_boxes``,
which uses this convention (tests/pipeline/roi/test_detect.py checks the round trip).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from pipeline.write import file_sha256 as sha256_file

log = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR = Path("~/.cache/regioncorpus/ultralytics")
_OFF_SETTINGS = {
    "sync": False, "hub": False, "clearml": False, "comet": False, "dvc": False, "mlflow": False,
    "neptune": False, "raytune": False, "tensorboard": False, "wandb": False,
    "vscode_msg": False, "openvino_msg": False,
}
_state: dict[str, object] = {}


def granted_cpus() -> int:
    """CPUs this process may keep busy, at least 1: inside a Ray actor or task, the CPUs Ray
    granted it (``get_assigned_resources()["CPU"]``, so actors sharing a node do not each start
    a thread per core); outside Ray (a driver, a plain process), ``os.cpu_count()``."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; never imported just to look
    if ray is not None and ray.is_initialized():
        ctx = ray.get_runtime_context()
        if ctx.get_task_id() is not None:  # a task or actor (None in the driver)
            return max(1, int(ctx.get_assigned_resources().get("CPU", 0)))
    return max(1, os.cpu_count() or 1)


def restore_threads() -> None:
    """Give torch the CPUs this process was granted again (:func:`granted_cpus`; ultralytics
    lowers the thread count on import and on device select)."""
    import torch

    n = granted_cpus()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _local_font(font: str = "Arial.ttf"):
    """Offline stand-in for ``ultralytics.utils.checks.check_font``: local file or None."""
    from ultralytics.utils import USER_CONFIG_DIR

    file = USER_CONFIG_DIR / Path(font).name
    return file if file.exists() else None


def _amp_without_download(model) -> bool:
    """Offline stand-in for ``check_amp``: AMP on CUDA devices, never on CPU/MPS."""
    return next(model.parameters()).device.type == "cuda"


def ultralytics_offline(config_dir: Path | None = None) -> ModuleType:
    """Import ultralytics with the network off and settings under ``config_dir``; idempotent.

    ``config_dir`` defaults to ``$YOLO_CONFIG_DIR`` if set, else ``~/.cache/regioncorpus/ultralytics``.
    It only takes effect on the first call in a process (ultralytics reads it on import).
    Returns the ``ultralytics`` module.
    """
    if "module" in _state:
        restore_threads()
        return _state["module"]  # type: ignore[return-value]
    if "ultralytics" in sys.modules:
        log.warning("ultralytics was imported before ultralytics_offline(): its config dir is "
                    "already fixed; settings and offline patches are applied now")
    os.environ["YOLO_OFFLINE"] = "1"
    # libgomp's default busy-wait makes 2 threads ~8x slower than 1 on an oversubscribed CPU
    # (measured: yolov8n train step); only effective if torch is not loaded yet
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if config_dir is not None or "YOLO_CONFIG_DIR" not in os.environ:
        folder = Path(config_dir or DEFAULT_CONFIG_DIR).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["YOLO_CONFIG_DIR"] = str(folder)
    os.environ.setdefault("YOLO_VERBOSE", "False")
    import ultralytics
    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as trainer_mod
    import ultralytics.utils.plotting as plotting
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    # check_det_dataset() asks the network for Arial.ttf (requests.head) even when offline, and
    # the trainer's AMP check downloads yolo26n.pt: use a local font or none, trust AMP on CUDA
    data_utils.check_font = _local_font
    plotting.check_font = _local_font
    trainer_mod.check_amp = _amp_without_download
    off = {k: v for k, v in _OFF_SETTINGS.items() if k in SETTINGS}
    off.update({k: str(USER_CONFIG_DIR / k.removesuffix("_dir"))
                for k in ("runs_dir", "weights_dir", "datasets_dir")})
    if any(SETTINGS.get(k) != v for k, v in off.items()):
        SETTINGS.update(off)
    restore_threads()
    _state["module"] = ultralytics
    return ultralytics


def add_thread_callbacks(model) -> None:
    """Restore torch threads whenever ultralytics has just selected the device (train/val/predict)."""
    for event in ("on_pretrain_routine_start", "on_train_start", "on_val_start",
                  "on_predict_start"):
        model.add_callback(event, lambda *_: restore_threads())




def resolve_device(device: str) -> str:
    """``auto`` → ``cuda:0`` when torch sees a GPU, else ``cpu``; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class DetectorConfig:
    """Settings of the detector stage."""

    weights: Path  # trained ultralytics checkpoint (.pt), e.g. RUN/weights/detector.pt
    conf: float = 0.25  # minimum confidence of a kept box
    iou: float = 0.5  # IoU threshold of non-maximum suppression
    imgsz: int | None = None  # letterbox size; None = the size the checkpoint was trained at
    device: str = "cpu"  # "cpu", "cuda:0", ... or "auto" (first GPU if any)
    half: bool = True  # FP16 inference; only used on CUDA (CPU always runs FP32)
    batch: int = 32  # images per forward pass
    class_map: dict[str, str] | None = None  # model class name → corpus label (unmapped: kept)

    def validate(self) -> None:
        if not Path(self.weights).is_file():
            raise ValueError(f"--detector {self.weights}: weights file not found")
        if not 0.0 <= self.conf <= 1.0:
            raise ValueError(f"--det-conf {self.conf}: must be in [0, 1]")
        if not 0.0 < self.iou <= 1.0:
            raise ValueError(f"--det-iou {self.iou}: must be in (0, 1]")
        if self.imgsz is not None and self.imgsz < 32:
            raise ValueError(f"DetectorConfig.imgsz {self.imgsz}: must be >= 32")
        if self.batch < 1:
            raise ValueError(f"DetectorConfig.batch {self.batch}: must be >= 1")


Detections = tuple[np.ndarray, np.ndarray, list[str]]


class Detector:
    """A YOLO checkpoint ready for batched prediction on grey or 3-channel (BGR, OpenCV order) uint8 images."""

    def __init__(self, cfg: DetectorConfig):
        cfg.validate()
        self.cfg = cfg
        ultralytics = ultralytics_offline()
        self.checkpoint_sha256 = sha256_file(Path(cfg.weights))
        self.model = ultralytics.YOLO(str(cfg.weights), task="detect")
        add_thread_callbacks(self.model)
        self.device = resolve_device(cfg.device)
        self.imgsz = int(cfg.imgsz or _trained_imgsz(self.model.overrides.get("imgsz")) or 640)
        names = self.model.names
        mapping = cfg.class_map or {}
        self.labels = {int(i): mapping.get(n, n) for i, n in names.items()}

    def predict(self, images: list[np.ndarray]) -> list[Detections]:
        """Boxes (N, 4) float32 XYXY pixels, scores (N,) float32 and labels, per input image."""
        if not images:
            return []
        batch = [_as_bgr(im, k) for k, im in enumerate(images)]
        half = self.cfg.half and self.device.startswith("cuda")
        out: list[Detections] = []
        for start in range(0, len(batch), self.cfg.batch):
            chunk = batch[start:start + self.cfg.batch]
            results = self.model.predict(
                chunk, batch=len(chunk), conf=self.cfg.conf, iou=self.cfg.iou, imgsz=self.imgsz,
                device=self.device, quantize=16 if half else None, verbose=False, save=False)
            for res in results:
                b = res.boxes
                boxes = b.xyxy.detach().cpu().numpy().astype(np.float32).reshape(-1, 4)
                scores = b.conf.detach().cpu().numpy().astype(np.float32).reshape(-1)
                classes = b.cls.detach().cpu().numpy().astype(int).reshape(-1)
                out.append((boxes, scores, [self.labels[c] for c in classes]))
        return out


def _trained_imgsz(value) -> int | None:
    if isinstance(value, (list, tuple)):
        value = max(value) if value else None
    return int(value) if value else None


def _as_bgr(image: np.ndarray, k: int) -> np.ndarray:
    """(H, W) grey or (H, W, 1|3) → contiguous (H, W, 3) uint8 (grey replicated)."""
    im = np.asarray(image)
    if im.dtype != np.uint8:
        raise ValueError(f"image {k}: expected uint8, got {im.dtype}")
    if im.ndim == 3 and im.shape[2] == 1:
        im = im[:, :, 0]
    if im.ndim == 2:
        return np.ascontiguousarray(np.repeat(im[:, :, None], 3, axis=2))
    if im.ndim == 3 and im.shape[2] == 3:
        return np.ascontiguousarray(im)
    raise ValueError(f"image {k}: expected (H, W) or (H, W, 3), got shape {im.shape}")


def evaluate_test(weights: Path, data_yaml: Path, images: list[dict], regions: list[dict], *,
                  imgsz: int, batch: int, device: str, conf: float, out: Path,
                  size_split_mm: float = 10.0) -> dict:
    """Test split of an exported dataset: mAP (ultralytics val) and box recall at IoU 0.5.

    ``images`` / ``regions``: table rows; the truth is every region given (already filtered to
    the classes) on the images whose split is test, sized by :func:`truth_size_mm`.
    """
    from pipeline.images.png import decode_png8
    from pipeline.roi.detector_data import box_recall, truth_size_mm

    test = [im for im in images if im["split"] == "test"]
    if not test:
        log.warning("no test images: evaluation skipped")
        return {"test_images": 0}
    model = ultralytics_offline().YOLO(str(weights), task="detect")
    add_thread_callbacks(model)
    val = model.val(data=str(data_yaml), split="test", imgsz=imgsz, batch=batch, device=device,
                    plots=False, verbose=False, save_json=False, project=str(out.parent),
                    name=out.name, exist_ok=True)
    ap50 = {model.names[int(c)]: float(v)
            for c, v in zip(val.box.ap_class_index, val.box.ap50, strict=True)}
    by_image: dict[str, list[dict]] = {}
    for r in regions:
        by_image.setdefault(r["image_id"], []).append(r)
    det = Detector(DetectorConfig(weights=weights, conf=conf, iou=0.5, imgsz=imgsz,
                                  device=device, batch=batch))
    preds = det.predict([decode_png8(im) for im in test])
    truth = [by_image.get(im["image_id"], []) for im in test]
    recall = box_recall(
        [p[0] for p in preds], [np.array([r["bbox"] for r in t]).reshape(-1, 4) for t in truth],
        iou=0.5, pred_labels=[p[2] for p in preds],
        true_labels=[[r["label"] for r in t] for t in truth],
        true_sizes_mm=[[truth_size_mm(r, im) for r in t] for t, im in zip(truth, test,
                                                                           strict=True)],
        size_split_mm=size_split_mm)
    return {"test_images": len(test), "test_patients": len({im["patient_key"] for im in test}),
            "map50": float(val.box.map50), "map50_95": float(val.box.map),
            "map50_by_class": ap50, "conf": conf, "box_recall": recall}
