"""Two text spaces (issue 20): region captions go through ``region_text_proj``, reports and
summaries through ``text_proj``, over one shared text tower; the grounding loss pairs region
captions in image space with their images.

* The region losses never reach ``text_proj``; the global and grounding losses never reach
  ``region_text_proj``; the grounding loss reaches ``text_proj`` and ``image_proj``
  (generated batches: 2–3 images with 0–3 regions). The features the loss sees are
  ``encode_text(..., region=True)`` of the captions and negatives, ``encode_text(...)`` of the
  reports and (grounding) of the captions, and the image embedding of each region's image.
* The grounding loss's positives are the caption's own image (image keys), not equal captions.
* evaluate-model (and the trainer's validation) scores regions against region-space texts and
  images against image-space texts: with ``region_text_proj = -text_proj`` the two spaces are
  mirror images, so any task that used the other space would score 0 instead of 1.
* Without the flag (the global-only ablation, runs saved before it) there is one space.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from micro import MICRO, K, P, WordTokenizer, sample

from model.clip import build_model
from model.collate import Collate
from model.config import RunConfig
from model.evaluate import embed_texts, retrieval, zero_shot
from model.loss import RegionClipLoss
from model.validate import Validator

WORDS = ["left", "right", "kidney", "lung", "liver", "nodule", "small", "large", "slice",
         "showing", "ct", "axial"]


def _model(**model_cfg) -> torch.nn.Module:
    cfg = RunConfig.from_dict({**MICRO, "model": {**MICRO["model"], **model_cfg}})
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=len(WORDS) + 2)


def _text(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 5))))


def _sample(rng: np.random.Generator, n_regions: int, i: int) -> dict:
    # the image's text is distinct per image: the global loss is not trivial
    return sample(rng, n_regions, i, lambda: _text(rng),
                  lambda: [_text(rng) for _ in range(K)], lambda: f"{WORDS[i]} {_text(rng)}")


def _grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _moved(g: torch.Tensor | None) -> bool:
    return g is not None and float(g.abs().max()) > 0


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), regions=st.lists(st.integers(0, 3), min_size=2, max_size=3))
def test_each_loss_reaches_its_own_text_projection(seed, regions):
    """Region + negative losses move ``region_text_proj`` (and the shared tower), never
    ``text_proj``; the global loss moves ``text_proj``, never ``region_text_proj``; the
    grounding loss moves ``text_proj`` and ``image_proj``, never the region projections."""
    regions[:2] = [max(n, 1) for n in regions[:2]]  # with one region, one image: every
    # contrastive loss over it is 0
    model = _model()
    loss_fn = RegionClipLoss(model.cfg.loss)
    rng = np.random.default_rng(seed)
    samples = [_sample(rng, n, i) for i, n in enumerate(regions)]
    batch = Collate(WordTokenizer(WORDS), max_len=8, negatives=K, points=P)(samples)
    terms = loss_fn(model(batch))
    g = _grads(model, terms["region_loss"] + terms["negative_loss"])
    assert _moved(g["region_text_proj.weight"]) and not _moved(g["text_proj.weight"])
    assert any(_moved(v) for k, v in g.items() if k.startswith("text."))  # the shared tower
    terms = loss_fn(model(batch))
    g = _grads(model, terms["global_loss"])
    assert _moved(g["text_proj.weight"]) and not _moved(g["region_text_proj.weight"])
    terms = loss_fn(model(batch))
    g = _grads(model, terms["grounding_loss"])
    assert _moved(g["text_proj.weight"]) and _moved(g["image_proj.weight"])
    assert not _moved(g["region_text_proj.weight"]) and not _moved(g["region_proj.weight"])


def test_features_are_the_two_encoders():
    """The loss's region caption features are ``encode_text(region=True)`` of the captions, its
    report features ``encode_text()`` of the reports; the two spaces differ."""
    model = _model().eval()
    tok = WordTokenizer(WORDS)
    rng = np.random.default_rng(1)
    samples = [_sample(rng, n, i) for i, n in enumerate([2, 1])]
    batch = Collate(tok, max_len=8, negatives=K, points=P)(samples)
    with torch.no_grad():
        f = model(batch)
        caps = [r["caption"] for s in samples for r in s["regions"]]
        negs = [t for s in samples for r in s["regions"] for t in r["negatives"]]
        reports = [s["global_text"] for s in samples]
        want = {k: torch.from_numpy(embed_texts(model, tok, t, 8, "cpu", region=k != "text"))
                for k, t in (("caps", caps), ("negs", negs), ("text", reports))}
        other = torch.from_numpy(embed_texts(model, tok, caps, 8, "cpu"))
    torch.testing.assert_close(f["region_text_features"], want["caps"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f["negative_features"].flatten(0, 1), want["negs"], atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(f["text_features"], want["text"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f["caption_image_features"], other, atol=1e-5, rtol=1e-5)
    assert float((other - want["caps"]).abs().max()) > 1e-3
    torch.testing.assert_close(f["region_image_features"], f["image_features"][[0, 0, 1]])
    keys = f["region_image_keys"].tolist()
    assert keys[0] == keys[1] != keys[2]


def test_grounding_positives_are_the_captions_own_image():
    """Captions c0, c1 of image A and c2 of image B, with c1 == c2 as text: the positives of a
    caption are the copies of its own image, of an image copy all its image's captions."""
    torch.manual_seed(0)
    cap, img = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(2, 8), dim=-1)
    keys = torch.tensor([7, 7, 9])  # image keys of the three regions
    f = {"caption_image_features": cap, "region_image_features": img[[0, 0, 1]],
         "region_image_keys": keys, "region_keys": torch.tensor([1, 2, 2]),  # caption keys
         "logit_scale": torch.tensor(10.0)}
    got = RegionClipLoss(RunConfig().loss)(f)["grounding_loss"]
    logits = 10.0 * cap @ img[[0, 0, 1]].T  # (3 captions, 3 image copies)
    same = (keys[:, None] == keys[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    want = (-(target * logits.log_softmax(1)).sum() - (target * logits.T.log_softmax(1)).sum()) / 6
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("model_cfg", [{"region_text_proj": False}, {"global_only": True}])
def test_one_text_space_without_the_flag(model_cfg):
    model = _model(**model_cfg).eval()
    assert model.region_text_proj is None
    texts = ["left kidney", "slice showing large lung nodule"]
    a = embed_texts(model, WordTokenizer(WORDS), texts, 8, "cpu")
    b = embed_texts(model, WordTokenizer(WORDS), texts, 8, "cpu", region=True)
    np.testing.assert_array_equal(a, b)


def test_saved_config_without_the_key_loads_as_one_space():
    """Runs saved before ``region_text_proj`` existed rebuild with one projection."""
    d = RunConfig.from_dict(MICRO).to_dict()
    del d["model"]["region_text_proj"]
    assert RunConfig.from_dict(d).model.region_text_proj is False


class _Corpus:
    """What :func:`model.evaluate.zero_shot` reads of a corpus: labels, sides, prompt."""

    labels = ["kidney", "lung", "liver"]
    sides = {"kidney": ["left"], "lung": ["right"], "liver": ["left"]}

    @staticmethod
    def prompt(label: str, side: str | None) -> str:
        return f"{side} {label}" if side else label


def test_evaluation_scores_each_kind_in_its_own_space():
    """Regions = region-space embeddings of their own prompts and captions, images = image-space
    embeddings of their own prompts and reports; with mirrored spaces every task scores 1 only
    if evaluate-model embeds each text in the space of what it is compared with."""
    model = _model().eval()
    with torch.no_grad():
        model.region_text_proj.weight.copy_(-model.text_proj.weight)
    tok = WordTokenizer(WORDS)
    c = _Corpus()
    caps = [c.prompt(lab, c.sides[lab][0]) for lab in c.labels]  # "left kidney", ...
    reports = [f"axial ct slice showing {t}" for t in caps]

    def emb(texts, region=False):
        return embed_texts(model, tok, texts, 8, "cpu", region=region)

    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    image_prompts = unit(np.stack([emb([t, f"slice showing {t}"]).mean(0) for t in caps]))
    e = {"region": emb(caps, region=True), "label": list(c.labels),
         "laterality": [c.sides[lab][0] for lab in c.labels], "caption": caps,
         "image": image_prompts, "image_labels": [[lab] for lab in c.labels],
         "report": reports}
    res = zero_shot(model, tok, c, e, "cpu")
    assert res["region_zero_shot"]["accuracy"] == 1.0
    assert res["laterality_zero_shot"]["accuracy"] == 1.0
    assert res["image_zero_shot"]["auc"] == 1.0
    e["image"] = emb(reports)
    r = retrieval(model, tok, e, "cpu")
    assert r["region_to_caption"]["r1"] == 1.0 and r["caption_to_region"]["r1"] == 1.0
    assert r["image_to_report"]["r1"] == 1.0 and r["report_to_image"]["r1"] == 1.0
    # the trainer's validation zero-shot (model/validate.py) uses the region space too
    val = Validator(c, model.cfg, tok, 0, 1, torch.device("cpu"), None)
    with torch.no_grad():
        labels = val._label_embeddings(model).numpy()
    np.testing.assert_allclose(labels, e["region"], atol=1e-5)
