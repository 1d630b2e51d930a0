"""pipeline: imaging collections → a de-identified, region-level corpus (``build-corpus``).

One sub-package per stage, in the order the data flows (docs/architecture.md has one row per
stage with its files):

=============  ===========================================================================
``ingest/``    discover (walk, header scan) → units (series/volume + label source; the
               public collection layouts) → read (``read_volume``: decode, de-identify,
               canonical RAS+ ``Volume``)
``labels/``    label maps on the volume's grid: NIfTI maps and masks, RTSTRUCT, SEG
``images/``    slicing (2D images, pixel → RAS geometry), windows, png (the one PNG codec)
``roi/``       regions from label maps; the model stage (propose: detector and SAM-family
               masks), segmenters, detector and its dataset export
``captions/``  attributes → region captions, hard negatives, summary and report; the
               optional rewriter; the independent checker
``run/``       the unit worker, shard assembly, executors (local, Ray), isolation, build
``phantoms/``  synthetic CT studies for demos and tests (nothing in ``pipeline`` imports it)
=============  ===========================================================================

Shared by the stages: ``config`` (``BuildConfig``), ``errors`` (reason codes), ``geometry``
(pure mask/box/RLE helpers), ``write`` (the corpus format: schemas, commit, manifest).

Public API (imported lazily, so ``import pipeline`` stays cheap)::

    from pipeline import read_volume, ReadConfig, Volume, IngestError, build, BuildConfig
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "read_volume": "pipeline.ingest.read",
    "ReadConfig": "pipeline.ingest.read",
    "Volume": "pipeline.ingest.volume",
    "IngestError": "pipeline.errors",
    "build": "pipeline.run.build",
    "BuildConfig": "pipeline.config",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
