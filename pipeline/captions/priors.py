"""python -m pipeline.captions.priors OUT.json CORPUS [CORPUS ...]

Measures the per-label priors the v2 negative sampler draws from (pipeline.captions.negatives)
on built corpora (the shipped ``priors_v2.json``: phantom corpora of seeds the tests and the
quick start do not use). Per canonical region label:

n            regions with attributes
diameter_rel 41 quantiles (0 %, 2.5 %, … 100 %) of the maximal diameter divided by the
             slice's body scale (√ body area, negatives.body_scale_mm); slices without a body
             are left out
intensity    modality and contrast (negatives.intensity_key) → intensity class → regions
laterality   measured side → regions (lesions)
location     organ a lesion lies in → regions
cooccur      labels of the same category seen on an image with it

Only labels of the structure vocabulary are kept (never a raw or neutral name). Changing the
shipped file changes the captions of new builds: make it a new caption version.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.captions.attributes import load_structures
from pipeline.captions.negatives import body_scale_mm, intensity_key
from pipeline.geometry import body_mask, to_uint8
from pipeline.images.png import decode_png
from pipeline.write import committed_tables, read_manifest

QUANTILES = np.linspace(0.0, 1.0, 41)


def _rows(corpus: Path) -> tuple[list[dict], dict[str, str], dict[str, float]]:
    """(regions with label, image_id, attributes; image_id → intensity key; image_id → body
    scale) of one corpus."""
    regions, modality, scale = [], {}, {}
    columns = ["image_id", "modality", "contrast", "pixel_spacing_mm", "image"]
    for files in committed_tables(corpus, read_manifest(corpus)).values():
        if "images" in files:
            for r in pq.read_table(files["images"], columns=columns).to_pylist():
                modality[r["image_id"]] = intensity_key(r["modality"], r["contrast"])
                body = body_mask(to_uint8(decode_png(r)))
                scale[r["image_id"]] = body_scale_mm(body, r["pixel_spacing_mm"])
        if "regions" in files:
            regions += pq.read_table(files["regions"],
                                     columns=["image_id", "label", "attributes"]).to_pylist()
    return regions, modality, scale


def measure_priors(corpora: list[Path], structures_version: str = "v1") -> dict:
    """The priors document (module docstring) of the regions of ``corpora``."""
    entries = load_structures(structures_version).entries
    diam, inten = defaultdict(list), defaultdict(lambda: defaultdict(Counter))
    side, loc, co = defaultdict(Counter), defaultdict(Counter), defaultdict(set)
    for corpus in corpora:
        regions, modality, scale = _rows(Path(corpus))
        on_image = defaultdict(set)
        for r in regions:
            a, label = r["attributes"], r["label"]
            if a is None or label not in entries:
                continue
            on_image[r["image_id"]].add(label)
            if scale.get(r["image_id"], 0.0) >= 1.0:
                diam[label].append(float(a["max_diameter_mm"]) / scale[r["image_id"]])
            inten[label][modality.get(r["image_id"]) or "?"][a["intensity_class"]] += 1
            if a["is_lesion"]:
                side[label][a["laterality"]] += 1
                if a["location"]:
                    loc[label][a["location"]] += 1
        for labels in on_image.values():
            for x in labels:
                co[x] |= {y for y in labels if entries[y].category == entries[x].category}
    out = {}
    for label in sorted(inten):
        out[label] = {
            "n": sum(sum(c.values()) for c in inten[label].values()),
            "diameter_rel": [round(float(v), 4) for v in np.quantile(diam[label], QUANTILES)]
            if diam[label] else [],
            "intensity": {m: dict(sorted(c.items())) for m, c in sorted(inten[label].items())},
            "laterality": dict(sorted(side[label].items())),
            "location": dict(sorted(loc[label].items())),
            "cooccur": sorted(co[label] - {label}),
        }
    return {"version": "v2", "measured_on": None, "labels": out}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    doc = measure_priors([Path(p) for p in argv[1:]])
    doc["measured_on"] = f"{len(argv) - 1} corpora"
    text = json.dumps(doc, indent=1)  # number lists on one line each
    text = re.sub(r"\[\s+([-0-9.,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  text)
    Path(argv[0]).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
