"""Typed configuration of the region-aware CLIP: towers, prompts, ROI branch, data, loss, training.

Presets are JSON files in ``model/presets/{name}.json`` with one object per section
(``image``, ``text``, ``prompt``, ``roi``, ``model``, ``data``, ``loss``, ``train``); keys not
given keep the dataclass defaults. ``RunConfig.to_dict`` / ``RunConfig.from_dict`` round-trip
through JSON (checkpoints and ``RUN/config.json`` hold that form).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

PRESET_DIR = Path(__file__).with_name("presets")


@dataclass
class ImageTowerConfig:
    image_size: int = 112  # global input side in pixels (square)
    patch_size: int = 16
    in_chans: int = 1  # greyscale PNGs
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    pre_norm: bool = True  # LayerNorm before the blocks (open_clip's ln_pre; most timm ViTs: none)
    norm_eps: float = 1e-5  # LayerNorm epsilon (timm ViTs: 1e-6)
    act: str = "gelu"  # MLP activation: gelu | gelu_tanh | quick_gelu (OpenAI CLIP weights)
    weights: str | None = None  # local ViT state dict: ours, open_clip or timm (model/pretrained.py)
    weights_rgb: str = "sum"  # RGB patch filters → 1 channel on import: sum | mean
    weights_norm: str = "none"  # source input normalisation folded into the patch embedding on
    # import: none | openai (CLIP) | imagenet | half (mean = std = 0.5)


@dataclass
class TextTowerConfig:
    hidden: int = 192
    layers: int = 2
    heads: int = 3
    intermediate: int = 768
    max_len: int = 48  # tokens per caption (longer ones are truncated)
    vocab_size: int = 3000  # WordPiece vocabulary trained on the corpus captions
    weights: str | None = None  # local pretrained BERT folder (config + weights + tokenizer)


@dataclass
class PromptConfig:
    points_per_region: int = 2  # 1 positive inside the mask + 1 negative outside the box
    mask_hidden: int = 16  # channels of the strided-conv mask downscaler
    drop_box: float = 0.2  # training-time prompt dropout (each kind independently)
    drop_points: float = 0.5
    drop_mask: float = 0.3


@dataclass
class RoiConfig:
    roi_size: int = 48  # ROI crop side fed to the shared ViT (pos-embed interpolated)
    context: float = 0.5  # margin added on every side, as a fraction of the box side
    min_side_px: float = 8.0  # crops are at least this many input pixels wide
    layers: int = 2  # ROI processor blocks (cross-attn to global tokens + self-attn + MLP)


@dataclass
class ModelConfig:
    embed_dim: int = 128
    init_logit_scale: float = 2.659260036932778  # log(1/0.07)
    max_logit_scale: float = 100.0
    siglip: bool = False  # sigmoid loss with a learnable bias instead of softmax CLIP
    init_logit_bias: float = -10.0
    global_only: bool = False  # ablation: no prompt encoder / ROI branch
    region_text_proj: bool = False  # region captions get their own text projection (presets:
    # on; off here so runs saved before it existed load unchanged)


@dataclass
class DataConfig:
    batch: int = 32  # images per micro-batch per rank
    regions_per_image: int = 4  # cap; extra regions are sampled per step
    negatives_per_region: int = 3  # K stored hard negatives used per region per step
    shuffle_buffer: int = 256
    workers: int = 1  # DataLoader workers per rank (0: in-process)
    global_text: str = "both"  # summary | report | both (random per sample)


@dataclass
class LossConfig:
    global_weight: float = 1.0
    region_weight: float = 1.0
    negative_weight: float = 0.5
    grounding_weight: float = 0.0  # region captions in image space against the batch's images
    # (model/loss.py); off here and in the presets: on 10 held-out patients it cost retrieval


@dataclass
class TrainConfig:
    stage_steps: tuple[int, ...] = (150, 250, 400)  # stage 1 global, 2 region, 3 joint
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    accum: int = 1
    log_every: int = 10
    ckpt_every: int = 100
    ckpt_minutes: float = 0.0  # also checkpoint once this many minutes passed (0: by steps only)
    keep_checkpoints: int = 1  # checkpoints kept: ckpt/last.pt and the N - 1 before it
    val_every: int = 0  # steps between validation passes on the val split (0: none)
    val_batches: int = 4  # micro-batches per validation pass and rank
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return int(sum(self.stage_steps))


@dataclass
class RunConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    roi: RoiConfig = field(default_factory=RoiConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "tiny"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        kw = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            sub = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
            kw[f.name] = _fill(sub, d[f.name]) if sub is not None else d[f.name]
        return cls(**kw)


def _fill(obj, values: dict):
    """A copy of dataclass ``obj`` with ``values`` applied (tuples restored from JSON lists)."""
    known = {f.name: f for f in fields(obj)}
    for k, v in values.items():
        if k not in known:
            raise ValueError(f"unknown config key {type(obj).__name__}.{k}")
        if isinstance(getattr(obj, k), tuple) and isinstance(v, list):
            v = tuple(v)
        setattr(obj, k, v)
    return obj


def load_preset(name: str) -> RunConfig:
    """RunConfig of ``model/presets/{name}.json``, or of a JSON file path (ValueError naming the
    preset if missing)."""
    path = Path(name) if name.endswith(".json") else PRESET_DIR / f"{name}.json"
    if not path.exists():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise ValueError(f"--preset {name}: unknown preset (have {', '.join(names)})")
    cfg = RunConfig.from_dict(json.loads(path.read_text()))
    cfg.preset = path.stem if name.endswith(".json") else name
    return cfg


def scale_stages(stage_steps: tuple[int, ...], total: int) -> tuple[int, ...]:
    """Stage lengths rescaled to sum to ``total`` (proportional, remainder to the last stage)."""
    if total <= 0:
        raise ValueError(f"--steps {total}: must be positive")
    base = sum(stage_steps)
    out = [int(total * s / base) for s in stage_steps[:-1]]
    out.append(total - sum(out))
    return tuple(out)
