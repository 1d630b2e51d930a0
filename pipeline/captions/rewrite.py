"""Optional caption rewriter: paraphrase with a LOCAL causal LM, keep it only if it checks out.

``--captioner hf:LOCAL_PATH`` loads a transformers causal LM and its tokenizer from a local
folder (``local_files_only``: nothing is downloaded). Every paraphrase goes through
:func:`states_facts`: it must state each checkable attribute of the region in the vocabulary's
words (label, side, size class or the diameter, intensity, location) and must not use a word
of another value of the same attribute. A paraphrase that fails keeps the template caption.
The caption checker applies the same test to captions that are not template renderings.
The rewriter runs where models run (the build process / model actor), never in the forked
ingest workers.
"""

from __future__ import annotations

import re
from functools import lru_cache

from pipeline.captions.attributes import load_vocab


def _label_nouns(vocab: dict) -> set[str]:
    """Every label name captions of ``vocab`` can use (v2: the structure vocabulary's nouns)."""
    names = set(vocab["label_display"].values()) | {x for v in vocab["confusers"].values() for x in v}
    if vocab.get("structures"):
        from pipeline.captions.structures import load_structures

        names |= {e.phrase.removeprefix("the ") for e in load_structures(vocab["structures"]).entries.values()}
    return names


def _words(kind: str, a: dict, vocab: dict, modality: str) -> tuple[list[str], list[str]]:
    """(phrases that must appear, phrases that must not) for one attribute of ``a``."""
    from pipeline.captions.describe import label_words
    from pipeline.captions.negatives import structure_of

    if kind == "label":
        own = label_words(a["label"], vocab)[1]
        return [own], sorted(x for x in _label_nouns(vocab) if x != own and x not in own
                             and own not in x and x != (a.get("location") or ""))
    entry = structure_of(a["label"], vocab)
    if kind == "laterality" and entry is not None and entry.side != "none":
        return [entry.side], [{"left": "right", "right": "left"}[entry.side]]
    if kind == "laterality":
        sides = {"right", "left"}
        if a["laterality"] in sides:
            return [a["laterality"]], sorted(sides - {a["laterality"]})
        return [], sorted(sides)
    if kind == "size":
        classes = [n for n, _, _ in vocab["size_classes_mm"]]
        must = [a["size_class"], f"{a['max_diameter_mm']:.0f} mm"]
        return must, [c for c in classes if c != a["size_class"]]
    if kind == "intensity":
        words = vocab["intensity_words"].get(modality, vocab["intensity_words"]["*"])
        return [words[a["intensity_class"]]], [w for k, w in words.items() if k != a["intensity_class"]]
    if kind == "location" and a.get("location"):
        return [a["location"]], []
    return [], []


def states_facts(text: str, a: dict, modality: str, vocab: dict | None = None) -> bool:
    """True when ``text`` states every checkable attribute of ``a`` and contradicts none."""
    vocab = vocab or load_vocab()
    low = " " + re.sub(r"[^a-z0-9 -]", " ", text.lower()) + " "
    has = lambda p: f" {p.lower()} " in low  # noqa: E731
    for kind in ("label", "laterality", "intensity", "location"):
        must, never = _words(kind, a, vocab, modality)
        if not all(has(m) for m in must) or any(has(n) for n in never):
            return False
    must, never = _words("size", a, vocab, modality)
    size_ok = has(must[0]) or has(must[1].replace(" mm", "")) and has("mm")
    return size_ok and not any(has(n) for n in never)


class Rewriter:
    """A local causal LM that paraphrases one caption at a time (greedy, short)."""

    def __init__(self, path: str, device: str = "cpu", max_new_tokens: int = 40):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device)
        self.model.eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    def paraphrase(self, caption: str) -> str:
        import torch

        prompt = f"Rewrite the finding in other words.\nFinding: {caption}\nRewritten:"
        ids = self.tok(prompt, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)
        text = self.tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        return text.strip().split("\n")[0].strip()


@lru_cache(maxsize=2)
def load_rewriter(spec: str, device: str = "cpu") -> Rewriter:
    """``hf:LOCAL_PATH`` → a cached :class:`Rewriter` (one per process)."""
    if not spec.startswith("hf:"):
        raise ValueError(f"--captioner {spec}: expected hf:LOCAL_PATH (a local transformers folder)")
    return Rewriter(spec[3:], device)


def guarded(caption: str, a: dict, modality: str, rewriter: Rewriter) -> tuple[str, bool]:
    """(paraphrase, True) when it states the facts; else (the template caption, False)."""
    candidate = rewriter.paraphrase(caption)
    if candidate and states_facts(candidate, a, modality):
        return candidate, True
    return caption, False


def rewrite_regions(regions: list[dict], images: list[dict], rewriter: Rewriter) -> dict:
    """Paraphrase every captioned region in place where the guard accepts; returns
    ``{"tried": regions paraphrased, "accepted": paraphrases kept}``."""
    modality = {im["image_id"]: im["modality"] for im in images}
    tried = accepted = 0
    for r in regions:
        if r.get("caption_region") and r.get("attributes"):
            r["caption_region"], ok = guarded(r["caption_region"], r["attributes"],
                                              modality[r["image_id"]], rewriter)
            tried, accepted = tried + 1, accepted + ok
    return {"tried": tried, "accepted": accepted}
