"""Box-prompted segmentation: SAM-family models (and a classical baseline) turn boxes into masks.

Public API::

    from pipeline.roi.segment import build_segmenter
    seg = build_segmenter("lite-medsam", device="cpu")      # or "sam:PATH", "otsu", "none", ...
    masks, scores = seg.predict(image, boxes)                # one image, N boxes
    results = seg.predict_batch(images, boxes_list)          # several images per encoder forward
    packed = seg.segment_batch(images, boxes_list)           # the same, masks bit-packed

Conventions (every function here):
    image   (H, W) grey or (H, W, 3) RGB numpy array, uint8 expected (see :func:`as_image`).
    boxes   (N, 4) float32 XYXY = (x0, y0, x1, y1) in pixel-EDGE coordinates of ``image``:
            pixel (column c, row r) covers [c, c+1) × [r, r+1), so the tight box of a component
            spanning columns c0..c1 and rows r0..r1 is (c0, r0, c1 + 1, r1 + 1). Boxes are
            clipped to [0, W] × [0, H].
    masks   (N, H, W) bool in the same frame as ``image``; scores (N,) float32 (SAM's predicted
            IoU; NaN for models without one).
    model frame: the S×S square the model sees (S = 256 LiteMedSAM, 1024 SAM): the image resized
            so its longest side is S (per-axis scale new/old, SAM's rounding), padded with zeros
            at the bottom/right. Edge coordinates scale exactly: x_model = x * new_w / W.

Segment-anything's prompt encoder adds 0.5 to box corners ("shift to pixel centre", i.e. it
takes pixel-INDEX coordinates); boxes are therefore handed to it as ``edge − 0.5`` so that the
encoder sees exactly the box edges. Nothing global is set (no torch.set_num_threads, no
default dtype, no cudnn flags); the models run under ``torch.inference_mode`` and, on CUDA with
``precision="auto"``, ``torch.autocast`` bf16 (fp16 where bf16 is unsupported).

Device work: :meth:`PromptSegmenter.segment_batch` uploads the uint8 images, resizes,
normalises and pads them on the model's device (torch ops, one call per image size), runs the
encoder ``batch_size`` images at a time, pastes the masks back, thresholds and bit-packs them
there (:func:`pack_masks`), so the host only copies bytes. Seconds of process CPU time spent
inside device work accumulate in ``device_s`` (what a benchmark subtracts to get the host's
own cost).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu

from pipeline.geometry import fill_holes
from pipeline.roi.segment_models import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    SPEC_HELP,
    ModelParts,
    ResizeLongestPad,
    autocast_dtype,
    load_lite_medsam,
    load_sam,
    parse_spec,
)

# ------------------------------------------------------------------------------ geometry


def box_pixel_slices(box: Sequence[float], shape: Sequence[int]) -> tuple[slice, slice]:
    """(rows, cols) slices of the pixels whose centres lie inside an XYXY edge box.

    Pixel c is inside when x0 <= c + 0.5 <= x1, so (c0, r0, c1 + 1, r1 + 1) gives rows r0..r1,
    cols c0..c1. Clipped to the (H, W) ``shape``; may be empty.
    """
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    h, w = int(shape[0]), int(shape[1])
    c0, c1 = max(0, int(np.ceil(x0 - 0.5))), min(w, int(np.floor(x1 - 0.5)) + 1)
    r0, r1 = max(0, int(np.ceil(y0 - 0.5))), min(h, int(np.floor(y1 - 0.5)) + 1)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """(4,) float32 tight XYXY edge box of a (H, W) bool mask; zeros when the mask is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


# ------------------------------------------------------------------------------ inputs


def as_image(image) -> np.ndarray:
    """Validate an image: (H, W), (H, W, 1) or (H, W, 3), real-valued; returns a numpy array.

    uint8 is the expected dtype. Other dtypes are accepted: min–max models normalise any range;
    the ImageNet-normalised SAM path first maps non-uint8 images min–max to [0, 255].
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3) or 0 in img.shape[:2]:
        raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {img.shape}")
    if not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise ValueError(f"image must be integer or float, got {img.dtype}")
    return img


def as_boxes(boxes, shape: Sequence[int]) -> np.ndarray:
    """Validate (N, 4) XYXY edge boxes (N may be 0) and clip them to [0, W] × [0, H]; float32."""
    b = np.asarray(boxes, dtype=np.float32)
    if b.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) XYXY, got shape {b.shape}")
    if not np.all(np.isfinite(b)) or np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1]):
        raise ValueError("boxes must be finite XYXY with x1 >= x0 and y1 >= y0")
    h, w = int(shape[0]), int(shape[1])
    return np.clip(b, 0, [w, h, w, h]).astype(np.float32)


def _empty(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, int(shape[0]), int(shape[1])), dtype=bool), np.zeros(0, dtype=np.float32)


# ------------------------------------------------------------------------------ packed masks

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # np.packbits' big-endian bit order


def pack_masks(masks) -> np.ndarray:
    """(N, H, W) bool masks (numpy, or a torch tensor on any device, packed there) → (N,
    ceil(H·W / 8)) uint8, row-major, as ``np.packbits(masks.reshape(N, -1), axis=1)``."""
    n, size = int(masks.shape[0]), int(masks.shape[1]) * int(masks.shape[2])
    if isinstance(masks, np.ndarray):
        return np.packbits(masks.reshape(n, size), axis=1)
    flat = masks.reshape(n, size).to(torch.uint8)
    pad = -flat.shape[1] % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    packed = (flat.reshape(n, (size + 7) // 8, 8) * weights).sum(-1, dtype=torch.uint8)
    return packed.cpu().numpy()


def unpack_masks(packed: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pack_masks`: (N, L) uint8 → (N, H, W) bool for ``shape`` (H, W)."""
    h, w = int(shape[0]), int(shape[1])
    bits = np.unpackbits(np.asarray(packed, np.uint8).reshape(-1, (h * w + 7) // 8), axis=1,
                         count=h * w)
    return bits.reshape(-1, h, w).view(bool)


# ------------------------------------------------------------------------------ segmenters


class Segmenter:
    """Boxes → masks. Subclasses implement :meth:`predict` (and may batch :meth:`predict_batch`).

    Attributes:
        name: registry name, e.g. "lite-medsam", "sam-vit_b", "otsu", "none".
        checkpoint_sha256: hex SHA-256 of the weights file; None without weights.
        produces_masks: False only for "none" (its ``predict`` returns masks=None).
        encoder_calls: images run through the image encoder (+1 per image; a batched forward
            of B images adds B). Empty box lists never reach the encoder.
        encoder_forwards: image-encoder forward calls (equals encoder_calls at batch size 1).
    """

    name = "segmenter"
    checkpoint_sha256: str | None = None
    produces_masks = True

    def __init__(self):
        self.encoder_calls = 0
        self.encoder_forwards = 0

    def predict(self, image, boxes) -> tuple[np.ndarray | None, np.ndarray]:
        """(masks (N, H, W) bool, scores (N,) float32) for one image and (N, 4) XYXY boxes."""
        raise NotImplementedError

    def predict_batch(self, images: Sequence, boxes_list: Sequence) -> list[tuple]:
        """[(masks, scores)] per image, as :meth:`predict`; the base class loops."""
        if len(images) != len(boxes_list):
            raise ValueError(f"{len(images)} images but {len(boxes_list)} box lists")
        return [self.predict(img, boxes) for img, boxes in zip(images, boxes_list, strict=False)]

    def segment_batch(self, images: Sequence, boxes_list: Sequence) -> list[tuple]:
        """[(packed masks (N, L) uint8 (:func:`pack_masks`) or None, scores (N,) float32)] per
        image: :meth:`predict_batch` in the compact form a model stage hands back."""
        out = self.predict_batch(images, boxes_list)
        return [(None if m is None else pack_masks(m), s) for m, s in out]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PromptSegmenter(Segmenter):
    """A SAM-family model (image encoder + prompt encoder + mask decoder) prompted with boxes.

    One image-encoder pass per image whatever N; all N boxes of an image go through the prompt
    encoder and mask decoder in one batched call (single-mask output, SAM's
    ``multimask_output=False``); mask = pasted logits > 0. ``batch_size`` images share one
    encoder forward in :meth:`predict_batch` / :meth:`segment_batch` (default 16, the build's
    ``--encoder-batch``). An image's embedding may move in its last bits with the batch it
    shares (LiteMedSAM's did not in a CPU check; a generic ViT's moved by ~1e-6): callers that
    need the same bytes on every run feed the same images in the same order, as the build
    does per shard; batch 1 gives the per-image results exactly. The modules of ``parts`` are
    moved to ``device`` and put in eval mode in place.
    """

    def __init__(self, parts: ModelParts, device="cpu", precision="auto", batch_size=16):
        super().__init__()
        self.name, self.checkpoint_sha256 = parts.name, parts.checkpoint_sha256
        self.device = torch.device(device)
        self.amp_dtype = autocast_dtype(self.device, precision)
        self.normalisation = parts.normalisation
        if self.normalisation not in ("minmax", "imagenet"):
            raise ValueError(
                f"normalisation must be 'minmax' or 'imagenet', got {self.normalisation!r}"
            )
        self.image_encoder = parts.image_encoder.to(self.device).eval()
        self.prompt_encoder = parts.prompt_encoder.to(self.device).eval()
        self.mask_decoder = parts.mask_decoder.to(self.device).eval()
        self.transform = ResizeLongestPad(parts.input_size)
        self.batch_size = int(batch_size)
        self.device_s = 0.0  # process CPU seconds inside device work (see module doc)
        mean, std = (torch.from_numpy(v).reshape(1, 3, 1, 1) for v in (SAM_PIXEL_MEAN,
                                                                       SAM_PIXEL_STD))
        self._mean, self._std = mean.to(self.device), std.to(self.device)

    @contextlib.contextmanager
    def _device_work(self):
        t = time.process_time()
        try:
            yield
        finally:
            self.device_s += time.process_time() - t

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W[, 3]) image → (3, S, S) float32 model input (resize, normalise, pad).

        "minmax" (LiteMedSAM, MedSAM): (x − min) / max(max − min, 1e-8) over the resized image.
        "imagenet" (SAM): (x − SAM pixel mean) / std on the 0–255 scale.
        Padding (zeros) comes after normalisation, as in SAM's ``Sam.preprocess``.
        """
        img = as_image(image)
        x = self.transform.apply_image(img)
        if self.normalisation == "minmax" or img.dtype != np.uint8:
            lo, hi = float(x.min()), float(x.max())
            x = (x - lo) / max(hi - lo, 1e-8)
            if self.normalisation == "imagenet":
                x = x * 255.0
        x = np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x
        if self.normalisation == "imagenet":
            x = (x - SAM_PIXEL_MEAN) / SAM_PIXEL_STD
        return torch.from_numpy(np.ascontiguousarray(self.transform.pad(x).transpose(2, 0, 1)))

    def preprocess_batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 3, S, S) float32 model inputs on the device, equal bit for bit to stacking
        :meth:`preprocess`: uint8 images of a size :meth:`ResizeLongestPad.device_factor`
        accepts are uploaded as bytes and resized/normalised/padded there, one call per size;
        any other image goes through :meth:`preprocess` on the host."""
        s = self.transform.target_length
        out = torch.zeros((len(images), 3, s, s), dtype=torch.float32, device=self.device)
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault((img.shape, img.dtype.str), []).append(i)
        for (shape, dtype), idx in groups.items():
            if dtype != "|u1" or self.transform.device_factor(*shape[:2]) is None:
                for i in idx:
                    out[i] = self.preprocess(images[i]).to(self.device)
                continue
            x = torch.from_numpy(np.stack([images[i] for i in idx])).to(self.device).float()
            x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
            x = self._normalise(self.transform.resize_tensor(x))
            out[idx, :, : x.shape[-2], : x.shape[-1]] = x
        return out

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) resized uint8-valued floats → normalised, as :meth:`preprocess`."""
        if self.normalisation == "minmax":
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            return (x - lo) / (hi - lo).clamp_min(1e-8)
        return (x.expand(-1, 3, -1, -1) - self._mean) / self._std

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, C, h, w) image embeddings; counts the encoder call."""
        with torch.inference_mode(), self._autocast():
            emb = self.image_encoder(batch.to(self.device))
        self.encoder_calls += int(batch.shape[0])
        self.encoder_forwards += 1
        return emb

    def decode(self, embedding: torch.Tensor, boxes: np.ndarray, size) -> tuple:
        """Masks for the (N, 4) image-frame boxes of one image from its (1, C, h, w) embedding.

        Returns (masks (N, H, W) bool, scores (N,) float32 predicted IoU), image frame.
        """
        masks, iou = self._masks(embedding, boxes, size)
        return masks.cpu().numpy(), iou

    def _masks(self, embedding: torch.Tensor, boxes: np.ndarray, size) -> tuple:
        """((N, H, W) bool masks on the device, (N,) float32 numpy predicted IoU)."""
        model_boxes = self.transform.apply_boxes(boxes, size) - 0.5  # encoder adds 0.5 back
        prompt = torch.from_numpy(model_boxes).to(self.device)
        with torch.inference_mode(), self._autocast():
            sparse, dense = self.prompt_encoder(points=None, boxes=prompt, masks=None)
            low_res, iou = self.mask_decoder(
                image_embeddings=embedding,
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
        with torch.inference_mode():
            masks = self.transform.paste_masks(low_res.float(), size) > 0
        return masks, iou[:, 0].float().cpu().numpy().astype(np.float32)

    def predict(self, image, boxes):
        """See :class:`Segmenter`: (masks (N, H, W) bool, scores (N,) float32 predicted IoU)."""
        return self.predict_batch([image], [boxes])[0]

    def predict_batch(self, images: Sequence, boxes_list: Sequence) -> list[tuple]:
        """[(masks (N_i, H_i, W_i) bool, scores (N_i,) float32)] per image.

        Images with boxes are encoded ``batch_size`` per forward (sizes may differ: each is
        resized/padded to S×S); images with no boxes get empty outputs and no encoder call.
        """
        return self._run(images, boxes_list, packed=False)

    def segment_batch(self, images: Sequence, boxes_list: Sequence) -> list[tuple]:
        """[(packed masks (N_i, L_i) uint8, scores (N_i,) float32)] per image: as
        :meth:`predict_batch`, the masks thresholded and bit-packed on the device."""
        return self._run(images, boxes_list, packed=True)

    def _run(self, images: Sequence, boxes_list: Sequence, packed: bool) -> list[tuple]:
        if len(images) != len(boxes_list):
            raise ValueError(f"{len(images)} images but {len(boxes_list)} box lists")
        items = [as_image(img) for img in images]
        boxes = [as_boxes(b, img.shape) for img, b in zip(items, boxes_list, strict=False)]
        out: list = [_empty(img.shape) for img in items]
        if packed:
            out = [(pack_masks(m), s) for m, s in out]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            with self._device_work():
                emb = self.encode(self.preprocess_batch([items[i] for i in chunk]))
                for j, i in enumerate(chunk):
                    masks, iou = self._masks(emb[j : j + 1], boxes[i], items[i].shape[:2])
                    out[i] = (pack_masks(masks) if packed else masks.cpu().numpy(), iou)
        return out


def otsu_object(crop: np.ndarray) -> np.ndarray:
    """The Otsu object of an (h, w) float crop (the inside of one box): (h, w) bool.

    Rule: threshold at Otsu's t; of the two classes (> t bright, <= t dark) the OBJECT is the
    one holding the smaller share of the crop's border pixels (the background is what touches
    most of the box border; a tie picks the bright class). Then its largest 4-connected
    component, holes filled. A constant crop gives an empty mask.
    """
    if crop.size == 0 or float(crop.max()) == float(crop.min()):
        return np.zeros(crop.shape, dtype=bool)
    bright = crop > threshold_otsu(crop)
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    obj = bright if border.mean() <= 0.5 else ~bright
    lab, n = ndimage.label(obj)
    if n == 0:
        return obj
    sizes = np.bincount(lab.ravel())[1:]
    return fill_holes(lab == (1 + int(np.argmax(sizes))))


class OtsuSegmenter(Segmenter):
    """Classical baseline: :func:`otsu_object` inside each box's pixels; scores are NaN."""

    name = "otsu"

    def predict(self, image, boxes):
        """(masks (N, H, W) bool, scores (N,) float32 NaN); pixels outside the box are False."""
        g = as_image(image).astype(np.float32)
        g = g.mean(axis=2) if g.ndim == 3 else g  # (H, W) grey: channel mean of RGB
        b = as_boxes(boxes, g.shape)
        masks = np.zeros((len(b),) + g.shape, dtype=bool)
        for i, box in enumerate(b):
            rows, cols = box_pixel_slices(box, g.shape)
            masks[i, rows, cols] = otsu_object(g[rows, cols])
        return masks, np.full(len(b), np.nan, dtype=np.float32)


class BoxOnlySegmenter(Segmenter):
    """The "none" segmenter: keeps boxes only. ``predict`` returns (None, (N,) float32 NaN scores)."""

    name = "none"
    produces_masks = False

    def predict(self, image, boxes):
        b = as_boxes(boxes, as_image(image).shape)
        return None, np.full(len(b), np.nan, dtype=np.float32)


# ------------------------------------------------------------------------------ filters


# ------------------------------------------------------------------------------ registry


def _lite(spec: str, variant, arg, device, precision, batch) -> Segmenter:
    if variant or arg:
        raise ValueError(f"segmenter {spec!r}: lite-medsam takes no variant or path; {SPEC_HELP}")
    return PromptSegmenter(load_lite_medsam(), device, precision, batch)


def _sam_family(kind: str) -> Callable[..., Segmenter]:
    def factory(spec: str, variant, arg, device, precision, batch) -> Segmenter:
        return PromptSegmenter(load_sam(kind, arg or "", variant, spec), device, precision, batch)

    return factory


def _plain(cls) -> Callable[..., Segmenter]:
    def factory(spec: str, variant, arg, device, precision, batch) -> Segmenter:
        if variant or arg:
            raise ValueError(f"segmenter {spec!r}: {cls.name} takes no variant or path")
        return cls()

    return factory


#: name → factory(spec, variant, arg, device, precision, batch); see :func:`build_segmenter`.
segmenter_registry: dict[str, Callable[..., Segmenter]] = {
    "lite-medsam": _lite,
    "sam": _sam_family("sam"),
    "medsam": _sam_family("medsam"),
    "otsu": _plain(OtsuSegmenter),
    "none": _plain(BoxOnlySegmenter),
}


def build_segmenter(
    spec: str = "lite-medsam", device: str = "cpu", precision: str = "auto", batch: int = 16
) -> Segmenter:
    """A :class:`Segmenter` from a spec string.

    Specs: "lite-medsam" (bundled, SHA-256-verified weights), "sam:PATH" (variant from the
    checkpoint) or "sam-vit_b|vit_l|vit_h:PATH", "medsam:PATH" (MedSAM vit_b, min–max input),
    "otsu", "none". ``device`` is any torch device string; ``precision`` one of
    :data:`PRECISIONS` (see :func:`autocast_dtype`); ``batch``: images per encoder forward.

    Raises:
        ValueError: unknown name (the message lists the names, how to install them and where
            checkpoints come from), missing checkpoint file, bad precision.
    """
    name, variant, arg = parse_spec(spec)
    if name not in segmenter_registry:
        raise ValueError(f"unknown segmenter {spec!r}; {SPEC_HELP}")
    autocast_dtype(device, precision)  # validate before loading anything
    return segmenter_registry[name](spec, variant, arg, device, precision, batch)
