"""Region-aware CLIP (RegionMed-CLIP ROI branch + MedP-CLIP feature-level region prompts).

Modules (one per part): ``config`` (typed dataclasses, JSON presets in ``presets/``),
``image_tower`` (ViT), ``text_tower`` (BertModel + WordPiece tokenizer), ``prompts`` (SAM-style
prompt encoder), ``roi`` (ROI crop through the shared ViT + ROI processor), ``clip`` (the whole
model, builder registry), ``loss`` (global / region / negative losses, distributed-correct),
``captions`` (stored captions or the documented fallback), ``data`` (streaming Parquet reader),
``collate``, ``train`` (training loop), ``trainlog``, ``checkpoint``, ``evaluate``, ``metrics``.
See docs/model.md.
"""
