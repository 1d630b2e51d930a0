"""Import a pretrained ViT (open_clip, timm, or this project's own) into the image tower.

:func:`read_weights` reads a local state dict (``.pt`` / ``.pth`` / ``.bin`` through
``torch.load(weights_only=True)``, ``.safetensors`` through safetensors), unwraps a training
checkpoint (``state_dict`` / ``model``), drops DDP's ``module.`` and ``torch.compile``'s
``_orig_mod.``, and finds the image tower: a CLIP's ``visual.`` keys, open_clip's timm trunk
``visual.trunk.`` (BiomedCLIP), or bare keys. :func:`import_weights` maps it onto
:class:`model.image_tower.VisionTransformer`:

====================================  ==============================  =============================
open_clip (``visual.``)               timm                            this tower
====================================  ==============================  =============================
conv1.weight (D, 3, p, p), no bias    patch_embed.proj.weight, bias   patch_embed (RGB → 1 channel)
class_embedding (D,)                  cls_token (1, 1, D)             cls_token
positional_embedding (1 + g², D)      pos_embed (1, [1 +] g², D)      pos_embed (bicubic to grid)
ln_pre                                norm_pre (or none)              norm_pre (``pre_norm``)
transformer.resblocks.i.ln_1, ln_2    blocks.i.norm1, norm2           blocks.i.norm1, norm2
…attn.in_proj_weight/bias: q | k | v  blocks.i.attn.qkv: q | k | v    blocks.i.attn.q, attn.kv
…attn.out_proj                        blocks.i.attn.proj              blocks.i.attn.proj
…mlp.c_fc, mlp.c_proj                 blocks.i.mlp.fc1, fc2           blocks.i.mlp.0, mlp.2
…ls_1.gamma, ls_2.gamma               blocks.i.ls1.gamma, ls2.gamma   folded into attn.proj, mlp.2
ln_post                               norm                            norm
proj                                  head, fc_norm                   not imported (unexpected)
====================================  ==============================  =============================

The 3 RGB patch filters become one by summing (``weights_rgb = "sum"``: the 1-channel tower on a
grey image equals the source on that image replicated to RGB) or averaging; ``weights_norm``
first folds the source's input normalisation (per-channel mean/std) into the filters and bias.
Biases the source has none of (open_clip's patch embedding, timm's ``qkv_bias=False``) are set
to zero, which is exact. LayerNorm epsilon and ``pre_norm`` follow the layout
(:func:`tower_options`); the number of heads and the MLP activation cannot be read from a state
dict and come from the preset. Errors are :class:`WeightsError` (a ``ValueError`` naming the
flag, the path the user typed and numbers; never a key or text read from the file).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ImageTowerConfig

WRAPPERS = ("module.", "_orig_mod.")  # DDP, torch.compile
CONTAINERS = ("state_dict", "model")  # a training checkpoint's weights
PREFIXES = ("visual.trunk.", "visual.", "")  # open_clip's timm trunk, a CLIP's image tower, bare
MARKERS = {"open_clip": "conv1.weight", "timm": "patch_embed.proj.weight",
           "own": "patch_embed.weight"}  # the patch embedding of each layout
TOP = {
    "open_clip": {"conv1.weight": "patch_embed.weight", "class_embedding": "cls_token",
                  "positional_embedding": "pos_embed", "ln_pre.weight": "norm_pre.weight",
                  "ln_pre.bias": "norm_pre.bias", "ln_post.weight": "norm.weight",
                  "ln_post.bias": "norm.bias"},
    "timm": {"patch_embed.proj.weight": "patch_embed.weight",
             "patch_embed.proj.bias": "patch_embed.bias", "cls_token": "cls_token",
             "pos_embed": "pos_embed", "norm_pre.weight": "norm_pre.weight",
             "norm_pre.bias": "norm_pre.bias", "norm.weight": "norm.weight",
             "norm.bias": "norm.bias"},
}
# layout → (block prefix, per-block renames, fused qkv prefix, layer-scale gammas)
BLOCKS = {
    "open_clip": ("transformer.resblocks.", {"ln_1": "norm1", "attn.out_proj": "attn.proj",
                                             "ln_2": "norm2", "mlp.c_fc": "mlp.0",
                                             "mlp.c_proj": "mlp.2"},
                  "attn.in_proj_", ("ls_1.gamma", "ls_2.gamma")),
    "timm": ("blocks.", {"norm1": "norm1", "attn.proj": "attn.proj", "norm2": "norm2",
                         "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"},
             "attn.qkv.", ("ls1.gamma", "ls2.gamma")),
    "own": ("blocks.", {}, "", ()),
}
EPS = {"open_clip": 1e-5, "timm": 1e-6}  # LayerNorm epsilon of each library's ViTs
NORMS = {  # input normalisation (mean, std) per RGB channel of the source model
    "none": None,
    "openai": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
RGB = ("sum", "mean")
ZERO_BIASES = ("patch_embed.bias", "attn.q.bias", "attn.kv.bias")


class WeightsError(ValueError):
    """An --image-weights file that cannot be imported into the preset's image tower."""


@dataclass
class SourceWeights:
    path: str  # as the user typed it
    layout: str  # open_clip | timm | own
    state: dict[str, torch.Tensor]  # the image tower's tensors, prefix removed
    ignored: int  # entries outside the image tower (a CLIP's text tower, logit scale, ...)


@dataclass
class ImportReport:
    layout: str  # open_clip | timm | own
    matched: list[str]  # tower keys set from the file
    missing: list[str]  # tower keys the file has nothing for (left at their initialisation)
    filled: list[str]  # tower biases the source model does not have, set to zero (exact)
    unexpected: list[str]  # image-tower keys of the file that were not used (heads, ...)
    ignored: int  # file entries outside the image tower
    grid: tuple[int, int]  # position-embedding grid: file → tower
    channels: tuple[int, int]  # patch-embedding input channels: file → tower

    def to_dict(self) -> dict:
        return asdict(self)


def read_weights(path: str | Path, cfg: ImageTowerConfig) -> SourceWeights:
    """The image tower of the state dict at ``path``, its layout recognised; checked against the
    preset's tower ``cfg`` (width, depth, patch, MLP, channels): WeightsError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--image-weights {path}: not found")
    flat, dropped = _flatten(_load(path), path)
    for prefix in PREFIXES:
        for layout, marker in MARKERS.items():
            if prefix + marker in flat:
                state = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
                source = SourceWeights(str(path), layout, state, dropped + len(flat) - len(state))
                check_architecture(source, cfg)
                return source
    raise WeightsError(f"--image-weights {path}: no key matches a ViT image tower (expected "
                       "open_clip, timm or this project's key names)")


def check_weights(cfg: ImageTowerConfig) -> None:
    """Validate ``cfg.weights`` and the import options before any work (WeightsError)."""
    _check_options(cfg)
    if cfg.weights:
        read_weights(cfg.weights, cfg)


def _check_options(cfg: ImageTowerConfig) -> None:
    if cfg.weights_rgb not in RGB or cfg.weights_norm not in NORMS:
        raise WeightsError(f"image.weights_rgb {cfg.weights_rgb} / image.weights_norm "
                           f"{cfg.weights_norm}: expected one of {RGB} / {tuple(NORMS)}")


def tower_options(source: SourceWeights) -> dict:
    """Tower options the file implies: ``pre_norm`` (it has a pre-norm) and, for open_clip and
    timm files, their libraries' LayerNorm ``norm_eps``."""
    pre = "ln_pre.weight" if source.layout == "open_clip" else "norm_pre.weight"
    out: dict = {"pre_norm": pre in source.state}
    if source.layout in EPS:
        out["norm_eps"] = EPS[source.layout]
    return out


def check_architecture(source: SourceWeights, cfg: ImageTowerConfig) -> None:
    """WeightsError unless the file's width, depth, patch size, MLP width and input channels
    fit ``cfg``."""
    s = source.state
    patch = s[MARKERS[source.layout]]  # (D, C, p, p)
    width, chans, side = patch.shape[0], patch.shape[1], patch.shape[-1]
    depth = _depth(source)
    mlp = s.get(_first_mlp(source))
    hidden = int(cfg.width * cfg.mlp_ratio)
    problems = [(what, got, want) for what, got, want in [
        ("width", width, cfg.width), ("depth", depth, cfg.depth),
        ("patch size", side, cfg.patch_size),
        ("MLP width", hidden if mlp is None else mlp.shape[0], hidden)] if got != want]
    if chans != cfg.in_chans and not (chans == 3 and cfg.in_chans == 1):
        problems.append(("input channels", chans, cfg.in_chans))
    if problems:
        what = "; ".join(f"{w} {got} in the file, {want} in the preset" for w, got, want in problems)
        raise WeightsError(f"--image-weights {source.path}: another architecture ({what})")


def import_weights(vit: nn.Module, source: SourceWeights, cfg: ImageTowerConfig) -> ImportReport:
    """Load ``source`` into ``vit`` (built from ``cfg``) → the report of what matched."""
    _check_options(cfg)
    state, used = _rename(source)
    own = vit.state_dict()
    src_grid = _embeddings(state, vit.grid, source.path)
    filled = [] if source.layout == "own" else _zero_biases(state, own)
    chans = state["patch_embed.weight"].shape[1]
    _patch_filters(state, cfg, source.path)
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if wrong:
        raise WeightsError(f"--image-weights {source.path}: {len(wrong)} tensors do not fit the "
                           "preset's tower (heads, MLP or grid)")
    load = {k: v for k, v in state.items() if k in own}
    missing, _ = vit.load_state_dict(load, strict=False)
    unexpected = sorted(set(source.state) - used) + sorted(k for k in state if k not in own)
    return ImportReport(source.layout, sorted(k for k in load if k not in filled), sorted(missing),
                        sorted(filled), unexpected, source.ignored, (src_grid, vit.grid),
                        (chans, cfg.in_chans))


def resample_pos_embed(pos: torch.Tensor, grid: int, prefix: int = 1) -> torch.Tensor:
    """Position embedding (1, prefix + g², D) → (1, prefix + grid², D): the ``prefix`` rows (cls)
    kept, the g × g patch rows resampled bicubically with antialiasing (timm's
    ``resample_abs_pos_embed``)."""
    old = math.isqrt(pos.shape[1] - prefix)
    if old == grid:
        return pos
    head, body = pos[:, :prefix], pos[:, prefix:].float()
    body = body.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    body = F.interpolate(body, size=(grid, grid), mode="bicubic", align_corners=False,
                         antialias=True)
    body = body.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
    return torch.cat([head, body], dim=1)


def _load(path: Path) -> object:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any unreadable file: the library's message may quote the file
        raise WeightsError(f"--image-weights {path}: not a readable state dict (.pt, .pth, "
                           ".bin with tensors only, or .safetensors)") from None


def _flatten(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors by key without wrapper prefixes, count of non-tensor entries dropped)."""
    for key in CONTAINERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"--image-weights {path}: not a state dict (a mapping of tensors)")
    out = {}
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor):
            for w in WRAPPERS:
                k = k.removeprefix(w)
            out[k] = v
    return out, len(obj) - len(out)


def _depth(source: SourceWeights) -> int:
    prefix = BLOCKS[source.layout][0]
    ids = {k[len(prefix):].split(".", 1)[0] for k in source.state if k.startswith(prefix)}
    return len({i for i in ids if i.isdigit()})


def _first_mlp(source: SourceWeights) -> str:
    return {"open_clip": "transformer.resblocks.0.mlp.c_fc.weight",
            "timm": "blocks.0.mlp.fc1.weight", "own": "blocks.0.mlp.0.weight"}[source.layout]


def _rename(source: SourceWeights) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(tensors under this tower's names, file keys used); qkv split, layer scale folded."""
    s = source.state
    if source.layout == "own":
        return dict(s), set(s)
    out = {dst: s[src] for src, dst in TOP[source.layout].items() if src in s}
    used = {src for src in TOP[source.layout] if src in s}
    prefix, names, qkv, gammas = BLOCKS[source.layout]
    for i in range(_depth(source)):
        src, dst = f"{prefix}{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            for a, b in names.items():
                if f"{src}{a}.{kind}" in s:
                    out[f"{dst}{b}.{kind}"] = s[f"{src}{a}.{kind}"]
                    used.add(f"{src}{a}.{kind}")
            if f"{src}{qkv}{kind}" in s:  # (3D, ...) rows q | k | v, heads contiguous in each
                w = s[f"{src}{qkv}{kind}"]
                out[f"{dst}attn.q.{kind}"], out[f"{dst}attn.kv.{kind}"] = w.split(
                    [w.shape[0] // 3, 2 * w.shape[0] // 3])
                used.add(f"{src}{qkv}{kind}")
        for gamma, layer in zip(gammas, ("attn.proj", "mlp.2"), strict=True):
            if src + gamma in s:  # x + γ·(W h + b) = x + (γW) h + γb
                g = s[src + gamma]
                out[f"{dst}{layer}.weight"] = g[:, None] * out[f"{dst}{layer}.weight"]
                if f"{dst}{layer}.bias" in out:
                    out[f"{dst}{layer}.bias"] = g * out[f"{dst}{layer}.bias"]
                used.add(src + gamma)
    return out, used


def _embeddings(state: dict[str, torch.Tensor], grid: int, path: str) -> int:
    """cls token to (1, 1, D); position embedding to (1, 1 + grid², D) (a cls row of zeros when
    the file has none, as timm's ``no_embed_class``) → the file's grid."""
    if "cls_token" in state:
        state["cls_token"] = state["cls_token"].reshape(1, 1, -1)
    pos = state.get("pos_embed")
    if pos is None:
        return grid
    pos = pos.reshape(1, -1, pos.shape[-1])
    n = pos.shape[1]
    prefix = 0 if math.isqrt(n) ** 2 == n else 1
    old = math.isqrt(n - prefix)
    if old * old != n - prefix:
        raise WeightsError(f"--image-weights {path}: position embedding of {n} rows is not a "
                           "square grid (with at most one cls row)")
    if not prefix:
        pos = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    state["pos_embed"] = resample_pos_embed(pos, grid)
    return old


def _zero_biases(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """Set the biases the source model does not have (no patch-embedding bias, qkv_bias=False)
    to zero → their names."""
    filled = [k for k in own if k.endswith(ZERO_BIASES) and k not in state
              and k.replace(".bias", ".weight") in state]
    for k in filled:
        state[k] = torch.zeros_like(own[k])
    return filled


def _patch_filters(state: dict[str, torch.Tensor], cfg: ImageTowerConfig, path: str) -> None:
    """Fold the source's input normalisation into the patch embedding, then RGB filters → the
    tower's channels (sum or mean)."""
    w, b = state["patch_embed.weight"], state["patch_embed.bias"]
    norm = NORMS[cfg.weights_norm]
    if norm is not None:
        if w.shape[1] != 3:
            raise WeightsError(f"--image-weights {path}: image.weights_norm needs RGB filters")
        mean, std = (torch.tensor(v, dtype=w.dtype)[None, :, None, None] for v in norm)
        w = w / std  # W·(x − m)/s + b = (W/s)·x + (b − Σ (W/s)·m)
        b = b - (w * mean).sum(dim=(1, 2, 3))
    if w.shape[1] != cfg.in_chans:  # 3 → 1 (check_architecture refused anything else)
        w = w.sum(1, keepdim=True) if cfg.weights_rgb == "sum" else w.mean(1, keepdim=True)
    state["patch_embed.weight"], state["patch_embed.bias"] = w, b
