"""The guarded rewriter: a real (tiny, random) local causal LM is rejected; facts are checked."""

from __future__ import annotations

import pytest

from pipeline.captions.rewrite import Rewriter, guarded, states_facts

FACTS = {"label": "liver mass", "is_lesion": True, "laterality": "right", "location": "liver",
         "location_relation": "in", "max_diameter_mm": 22.4, "size_class": "medium-sized",
         "intensity_class": "hypo", "shape_class": "round"}
CAPTION = "A medium-sized hypodense liver mass in the liver, on the right."


def test_states_facts_accepts_true_paraphrases_and_rejects_contradictions():
    assert states_facts(CAPTION, FACTS, "CT")
    assert states_facts("On the right side, the liver holds a 22 mm hypodense liver mass.", FACTS, "CT")
    assert not states_facts("A medium-sized hypodense liver mass in the liver, on the left.", FACTS, "CT")
    assert not states_facts("A medium-sized hyperdense liver mass in the liver, on the right.", FACTS, "CT")
    assert not states_facts("A large hypodense liver mass in the liver, on the right.", FACTS, "CT")
    assert not states_facts("A medium-sized hypodense kidney mass in the liver, on the right.", FACTS, "CT")
    assert not states_facts("Something in the abdomen.", FACTS, "CT")


def test_states_facts_with_the_structure_vocabulary():
    """v2: the structure's phrase carries its side; another structure's name or the other side
    is a contradiction."""
    from pipeline.captions.attributes import load_vocab

    v2 = load_vocab("v2")
    facts = dict(FACTS, label="adrenal_gland_left", is_lesion=False, laterality="left",
                 location=None, location_relation=None, max_diameter_mm=21.0)
    assert states_facts("The left adrenal gland, spanning 21 mm, hypodense.", facts, "CT", v2)
    assert states_facts("A medium-sized hypodense left adrenal gland.", facts, "CT", v2)
    assert not states_facts("The right adrenal gland, spanning 21 mm, hypodense.", facts, "CT", v2)
    assert not states_facts("The left kidney, spanning 21 mm, hypodense.", facts, "CT", v2)
    assert not states_facts("The left adrenal gland, spanning 21 mm, hyperdense.", facts, "CT", v2)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A randomly initialised GPT-2 with a WordLevel tokenizer, saved as a local HF folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([CAPTION, "rewrite the finding in other words", "finding rewritten"] * 5,
                            trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    path = tmp_path_factory.mktemp("tiny_lm")
    fast.save_pretrained(path)
    cfg = GPT2Config(vocab_size=len(fast), n_positions=128, n_embd=16, n_layer=1, n_head=2,
                     eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return str(path)


def test_random_lm_output_is_rejected_and_template_kept(tiny_lm):
    rewriter = Rewriter(tiny_lm, max_new_tokens=12)
    paraphrase = rewriter.paraphrase(CAPTION)
    assert paraphrase != CAPTION  # the model really generated something
    text, accepted = guarded(CAPTION, FACTS, "CT", rewriter)
    assert not accepted and text == CAPTION


def test_build_with_captioner_keeps_checkable_captions(tiny_lm, tmp_path):
    import json

    import nibabel as nib
    import numpy as np

    from pipeline.captions.check import verify_captions
    from workflows.build_corpus import main

    src = tmp_path / "src"
    src.mkdir()
    hu = np.full((40, 40, 3), -1000, np.int16)
    hu[5:35, 5:35] = 40
    lab = np.zeros(hu.shape, np.uint8)
    lab[8:16, 10:18, 1] = 1
    hu[lab == 1] = 150
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(hu, aff), src / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), src / "ct_seg.nii.gz")
    (src / "ct_seg.json").write_text(json.dumps({"1": "liver_mass"}))
    out = tmp_path / "c"
    assert main([str(src), "--out", str(out), "--every-k", "0",
                 "--captioner", f"hf:{tiny_lm}"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    # the rewriter ran on the one region; the random LM's paraphrase was refused
    assert manifest["captions_rewritten"] == {"tried": 1, "accepted": 0}
    report = verify_captions(out)
    assert report["ok"] and report["regions"] == 1
