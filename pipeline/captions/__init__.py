"""Stage 5, captions: an image's final regions → attributes, region captions, hard negatives,
summary and report. Captions are made once per image, by ``describe``, after its regions are
final: in the unit worker when no model stage follows, else right after the model stage
(``RegionConfig.uses_models`` decides, in one place).

attributes.py   facts measured from pixels and masks (size, intensity, shape, location)
describe.py     templates → captions and negatives; vocab_v<N>.json holds the vocabulary
structures.py   the structure vocabulary (structures_v1.json): label names → canonical labels,
                display phrases, sides, categories; the label-name gate
negatives.py    the v2 negative sampler: values drawn from per-structure priors (priors_v2.json)
priors.py       measures those priors on built corpora
rewrite.py      optional guarded paraphrases from a local causal LM (``--captioner``)
check.py        the independent checker: re-derives every fact from the stored PNG and RLE
blind.py        the blind-model check: a text-only classifier on captions vs negatives
findings.py     the finding vocabulary (findings_v1.json) of annotation tables and reports
grounded.py     report captions and report-grounded region captions (after describe), and
                their check
"""
