"""Pretrained towers: open_clip and timm ViTs (tiny, random weights, saved to tmp_path) imported
into the image tower compute the source model's features; refusals exit 2 in one line."""

from __future__ import annotations

import json

import pytest
import torch
from open_clip.transformer import QuickGELU as OcQuickGELU
from open_clip.transformer import VisionTransformer as OpenClipViT
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from model.config import ImageTowerConfig
from model.image_tower import VisionTransformer, build_image_tower
from model.pretrained import NORMS, WeightsError, read_weights, resample_pos_embed

W, DEPTH, HEADS, PATCH = 32, 2, 2, 8
CANARY = "PATIENT_NAME_CANARY"


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter perturbed (norm scales, zero-initialised biases, layer scales, ...), so
    no mapping error hides behind a default value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _grey(n: int, side: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(seed))


def _tower(path, side: int = 32, **kw) -> VisionTransformer:
    cfg = ImageTowerConfig(image_size=side, patch_size=PATCH, width=W, depth=DEPTH, heads=HEADS,
                           weights=str(path), **kw)
    return build_image_tower(cfg).eval()


def _open_clip(ls: float | None, no_ln_pre: bool, quick: bool, seed: int) -> OpenClipViT:
    act = OcQuickGELU if quick else nn.GELU
    return _randomise(OpenClipViT(32, PATCH, W, DEPTH, HEADS, 4.0, ls_init_value=ls,
                                  output_dim=16, no_ln_pre=no_ln_pre, act_layer=act,
                                  output_tokens=True), seed)


def _timm(seed: int, size: int = 32, **kw) -> TimmViT:
    return _randomise(TimmViT(img_size=size, patch_size=PATCH, embed_dim=W, depth=DEPTH,
                              num_heads=HEADS, num_classes=0, dynamic_img_size=True, **kw), seed)


def _save_clip(path, visual: nn.Module) -> None:
    """As open_clip's training checkpoint: DDP prefix, a text tower beside the image tower."""
    state = {f"module.visual.{k}": v for k, v in visual.state_dict().items()}
    state["module.text.token_embedding.weight"] = torch.randn(10, W)
    state["module.logit_scale"] = torch.tensor(2.0)
    torch.save({"epoch": 3, "state_dict": state}, path)


@pytest.mark.parametrize(("ls", "no_ln_pre", "quick"),
                         [(None, False, False), (0.3, False, True), (None, True, False)])
def test_open_clip_vit_features_equal(tmp_path, ls, no_ln_pre, quick):
    src = _open_clip(ls, no_ln_pre, quick, seed=0)
    path = tmp_path / "open_clip.pt"
    _save_clip(path, src)
    vit = _tower(path, act="quick_gelu" if quick else "gelu")
    x = _grey(3, 32)
    with torch.no_grad():
        pooled, tokens = src(x.expand(-1, 3, -1, -1))  # (B, 16) projected, (B, N, D)
        ours = vit(x)  # (B, 1 + N, D)
    torch.testing.assert_close(ours[:, 1:], tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:, 0] @ src.proj, pooled, rtol=1e-5, atol=1e-5)
    rep = vit.import_report
    assert rep.layout == "open_clip" and rep.missing == [] and rep.ignored == 2
    assert rep.unexpected == ["proj"]  # the CLIP projection head is not part of the tower
    assert "patch_embed.bias" in rep.filled and "blocks.1.attn.kv.weight" in rep.matched
    assert vit.cfg.pre_norm is not no_ln_pre and vit.cfg.norm_eps == 1e-5


@pytest.mark.parametrize("kw", [
    {},  # timm's ImageNet ViT: no pre-norm, qkv bias
    {"qkv_bias": False, "init_values": 0.5},  # zero-filled qkv bias, layer scale folded
    {"pre_norm": True, "no_embed_class": True},  # CLIP-style pre-norm; no cls position row
])
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_timm_vit_features_equal(tmp_path, kw, suffix):
    src = _timm(seed=1, **kw)
    path = tmp_path / f"timm{suffix}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    vit = _tower(path)
    x = _grey(2, 32)
    with torch.no_grad():
        want = src.forward_features(x.expand(-1, 3, -1, -1))
        ours = vit(x)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    rep = vit.import_report
    assert rep.layout == "timm" and rep.missing == [] and rep.unexpected == []
    assert vit.cfg.pre_norm is bool(kw.get("pre_norm")) and vit.cfg.norm_eps == 1e-6
    assert ("blocks.0.attn.q.bias" in rep.filled) is (kw.get("qkv_bias") is False)


@pytest.mark.parametrize("side", [48, 24])  # grid 4 → 6 (up) and 4 → 3 (down, antialiased)
def test_grid_interpolation_carries_cls_and_positions(tmp_path, side):
    src = _timm(seed=2)
    path = tmp_path / "timm.pt"
    torch.save(src.state_dict(), path)
    vit = _tower(path, side=side)
    g = side // PATCH
    assert vit.pos_embed.shape == (1, 1 + g * g, W)
    assert vit.import_report.grid == (4, g)
    torch.testing.assert_close(vit.cls_token.data, src.cls_token.data)
    torch.testing.assert_close(vit.pos_embed.data[:, 0], src.pos_embed.data[:, 0])  # cls row
    torch.testing.assert_close(vit.pos_embed.data,
                               resample_abs_pos_embed(src.pos_embed.data, [g, g]))
    x = _grey(2, side)
    with torch.no_grad():  # timm resamples its own embedding for the other input size
        want = src.forward_features(x.expand(-1, 3, -1, -1))
        torch.testing.assert_close(vit(x), want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(resample_pos_embed(src.pos_embed.data, g)[:, 1:],
                           torch.zeros(1, g * g, W))


def test_input_normalisation_and_mean_filters_are_folded(tmp_path):
    src = _open_clip(None, False, False, seed=3)
    path = tmp_path / "open_clip.pt"
    _save_clip(path, src)
    x = _grey(2, 32)
    rgb = x.expand(-1, 3, -1, -1)
    mean, std = (torch.tensor(v)[None, :, None, None] for v in NORMS["openai"])
    with torch.no_grad():
        normed = _tower(path, weights_norm="openai")(x)
        torch.testing.assert_close(normed[:, 1:], src((rgb - mean) / std)[1], rtol=1e-5,
                                   atol=1e-5)
        averaged = _tower(path, weights_rgb="mean")(x)
        torch.testing.assert_close(averaged[:, 1:], src(rgb / 3)[1], rtol=1e-5, atol=1e-5)


def test_own_tower_weights_still_load_at_another_grid(tmp_path):
    torch.manual_seed(0)
    own = VisionTransformer(ImageTowerConfig(image_size=32, patch_size=PATCH, width=W,
                                             depth=DEPTH, heads=HEADS))
    path = tmp_path / "ours.pt"
    torch.save({"state_dict": own.state_dict()}, path)
    vit = _tower(path, side=48)
    rep = vit.import_report
    assert rep.layout == "own" and rep.missing == [] and rep.unexpected == [] and rep.filled == []
    torch.testing.assert_close(vit.blocks[1].attn.kv.weight.data, own.blocks[1].attn.kv.weight.data)
    assert vit.pos_embed.shape == (1, 37, W) and vit.cfg.pre_norm and vit.cfg.norm_eps == 1e-5


def _bad_files(tmp_path) -> dict[str, tuple]:
    torch.save(_timm(seed=4).state_dict(), tmp_path / "ok.pt")
    deep = TimmViT(img_size=32, patch_size=PATCH, embed_dim=W, depth=DEPTH + 1, num_heads=HEADS,
                   num_classes=0)
    torch.save(deep.state_dict(), tmp_path / "deep.pt")
    torch.save(TimmViT(img_size=32, patch_size=PATCH, embed_dim=2 * W, depth=DEPTH,
                       num_heads=HEADS, num_classes=0).state_dict(), tmp_path / "wide.pt")
    torch.save({f"{CANARY}.weight": torch.zeros(3)}, tmp_path / "nothing.pt")
    (tmp_path / "garbage.bin").write_bytes(b"\x00" * 64 + CANARY.encode())
    return {"deep.pt": ("depth 3 in the file, 2 in the preset",),
            "wide.pt": ("width 64 in the file, 32 in the preset",),
            "nothing.pt": ("no key matches a ViT image tower",),
            "garbage.bin": ("not a readable state dict",),
            "absent.pt": ("not found",)}


def test_refusals_name_the_problem_never_the_file_keys(tmp_path):
    cfg = ImageTowerConfig(image_size=32, patch_size=PATCH, width=W, depth=DEPTH, heads=HEADS)
    for name, (why,) in _bad_files(tmp_path).items():
        with pytest.raises(WeightsError, match=why) as e:
            read_weights(tmp_path / name, cfg)
        assert CANARY not in str(e.value)
    assert read_weights(tmp_path / "ok.pt", cfg).layout == "timm"


def _preset(tmp_path, micro: dict, **image) -> str:
    p = tmp_path / "preset.json"
    p.write_text(json.dumps({**micro, "image": {**micro["image"], **image}}))
    return str(p)


def test_train_model_refuses_bad_image_weights_with_exit_2(tmp_path, capsys):
    from tests.model.conftest import MICRO
    from workflows.train_model import main

    files = _bad_files(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text("{}")  # the flag checks run before the corpus is read
    preset = _preset(tmp_path, MICRO, image_size=32, patch_size=PATCH, width=W, depth=DEPTH,
                     heads=HEADS)
    for name, (why,) in files.items():
        rc = main(["--corpus", str(corpus), "--out", str(tmp_path / "run"), "--preset", preset,
                   "--image-weights", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "--image-weights" in err, err
        assert CANARY not in err and (why in err or name == "absent.pt")
    assert not (tmp_path / "run").exists()


def test_short_run_from_an_imported_timm_tower(tiny_corpus, tmp_path, capsys):
    """train-model --image-weights: a few steps from a timm ViT whose cls token is a marker;
    the checkpoint's config rebuilds the imported tower's options and the marker survives."""
    from model.checkpoint import load_run
    from tests.model.conftest import MICRO
    from workflows.train_model import main

    img = MICRO["image"]
    src = TimmViT(img_size=32, patch_size=img["patch_size"], embed_dim=img["width"],
                  depth=img["depth"], num_heads=img["heads"], num_classes=0)
    with torch.no_grad():
        src.cls_token.fill_(5.0)
    weights = tmp_path / "imagenet_vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, weights)
    run = tmp_path / "run"
    rc = main(["--corpus", str(tiny_corpus), "--out", str(run), "--preset",
               _preset(tmp_path, MICRO), "--image-weights", str(weights), "--steps", "3",
               "--workers", "0", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)  # --json: the summary document on stdout
    assert summary["steps"] == 3 and summary == json.loads((run / "summary.json").read_text())
    model, _, cfg = load_run(run)
    assert cfg.image.pre_norm is False and cfg.image.norm_eps == 1e-6
    assert cfg.image.weights == str(weights)
    cls = model.visual.cls_token.detach()
    assert torch.allclose(cls, torch.full_like(cls, 5.0), atol=0.05)  # 3 small AdamW steps
