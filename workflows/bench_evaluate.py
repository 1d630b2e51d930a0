"""python -m workflows.bench_evaluate [--regions 10000,100000] [--dim 512] [--device cpu] [--dense 10000]

Peak memory of evaluate-model's metrics at several gallery sizes: synthetic unit embeddings
(regions; images = regions / 4; distinct captions = regions / 10 and reports = images / 2, as
templated corpora repeat texts; 20 labels) go through the same blocked functions evaluate-model
uses (model/metrics.py: region and image zero-shot, laterality, retrieval in all four
directions). Each size runs in a fresh process that reports its RSS once the embeddings exist,
its peak RSS while the metrics run (VmHWM, reset after the inputs were made) and the
difference: the metrics' working memory, which must stay flat as the gallery grows. ``--dense N`` also runs, at N regions, the former dense retrieval (an
(items × gallery) similarity matrix, a relevance matrix and a full argsort) for contrast.
Prints one markdown row per run for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see workflows/train_model.py

LABELS = 20


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so the inputs' own creation does not
    count as the metrics' peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _unit(rng, n: int, d: int):
    import numpy as np

    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _inputs(regions: int, dim: int) -> dict:
    import numpy as np
    from scipy import sparse

    rng = np.random.default_rng(0)
    images, captions = max(regions // 4, 1), max(regions // 10, 1)
    reports = max(images // 2, 1)
    e = {"region": _unit(rng, regions, dim), "image": _unit(rng, images, dim),
         "caption": _unit(rng, captions, dim), "report": _unit(rng, reports, dim),
         "prompts": _unit(rng, LABELS, dim), "img_prompts": _unit(rng, LABELS, dim),
         "label": rng.integers(0, LABELS, regions), "cap_key": rng.integers(0, captions, regions),
         "rep_key": rng.integers(0, reports, images), "lat": rng.standard_normal((regions, 2)),
         "side": rng.integers(0, 2, regions)}
    rows = np.repeat(np.arange(images), 3)
    e["truth"] = sparse.csr_matrix((np.ones(len(rows), bool),
                                    (rows, rng.integers(0, LABELS, len(rows)))),
                                   shape=(images, LABELS))
    return e


def _blocked(e: dict, device: str) -> dict:
    """The metric calls of model/evaluate.py, on synthetic embeddings."""
    import numpy as np

    from model import metrics as m

    out = {"region_zero_shot": m.single_label(m.EmbeddingScores(e["region"], e["prompts"],
                                                                device), e["label"]),
           "image_zero_shot": m.multi_label(m.EmbeddingScores(e["image"], e["img_prompts"],
                                                              device), e["truth"]),
           "laterality_zero_shot": m.single_label(e["lat"], e["side"])}
    for name, items, key, texts in (("image", e["image"], e["rep_key"], e["report"]),
                                    ("region", e["region"], e["cap_key"], e["caption"])):
        tk = np.arange(len(texts))
        out[f"{name}_to_text"] = m.retrieval_recall(items, texts, key, tk, device=device)
        out[f"text_to_{name}"] = m.retrieval_recall(texts, items, tk, key, device=device)
    return out


def _dense(e: dict) -> dict:
    """The former retrieval: (items × gallery) similarity and relevance matrices, full argsort."""
    import numpy as np

    out = {}
    for name, items, key, texts in (("image", e["image"], e["rep_key"], e["report"]),
                                    ("region", e["region"], e["cap_key"], e["caption"])):
        rel = np.zeros((len(items), len(texts)), bool)
        rel[np.arange(len(items)), key] = True
        sim = items @ texts.T
        for direction, s, r in ((f"{name}_to_text", sim, rel), (f"text_to_{name}", sim.T, rel.T)):
            order = np.argsort(-s, axis=1)
            rs = np.take_along_axis(r, order, axis=1)
            first = np.where(rs.any(1), rs.argmax(1), s.shape[1] + 1)
            out[direction] = {"r1": float((first < 1).mean())}
    return out


def one(regions: int, dim: int, device: str, dense: bool) -> dict:
    """Run one size in this process; peak and input RSS in MiB."""
    import torch

    import model.metrics  # noqa: F401  (its imports are not the metrics' working memory)

    torch.set_grad_enabled(False)
    e = _inputs(regions, dim)
    _reset_peak()
    loaded = _status_mib("VmRSS")
    t0 = time.perf_counter()
    res = _dense(e) if dense else _blocked(e, device)
    wall = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    row = {"method": "dense" if dense else "blocked", "regions": regions,
           "images": len(e["image"]), "captions": len(e["caption"]), "reports": len(e["report"]),
           "dim": dim, "device": device, "rss_inputs_mib": round(loaded),
           "rss_peak_mib": round(peak), "working_mib": round(peak - loaded),
           "seconds": round(wall, 1), "r1_region_to_text": res["region_to_text"]["r1"]}
    if device.startswith("cuda"):
        row["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_evaluate", description=__doc__.split("\n\n")[1])
    p.add_argument("--regions", default="10000,100000", help="region counts, comma-separated")
    p.add_argument("--dim", type=int, default=512, help="embedding size (base preset: 512)")
    p.add_argument("--device", default="cpu", help="torch device for the blocked metrics")
    p.add_argument("--dense", default="", help="region counts to also run the former dense way")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child: method:regions
    a = p.parse_args(argv)
    if a.one:
        method, n = a.one.split(":")
        print(json.dumps(one(int(n), a.dim, a.device, method == "dense")))
        return 0
    runs = [("blocked", int(n)) for n in a.regions.split(",") if n]
    runs += [("dense", int(n)) for n in a.dense.split(",") if n]
    print("| method | regions | images | distinct captions | dim | device | RSS with inputs "
          "(MiB) | peak RSS (MiB) | working (MiB) | seconds |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for method, n in runs:
        r = subprocess.run([sys.executable, "-m", "workflows.bench_evaluate", "--one",
                            f"{method}:{n}", "--dim", str(a.dim), "--device", a.device],
                           capture_output=True, text=True, check=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {row['method']} | {n} | {row['images']} | {row['captions']} | {a.dim} | "
              f"{a.device} | {row['rss_inputs_mib']} | {row['rss_peak_mib']} | "
              f"{row['working_mib']} | {row['seconds']} |"
              + (f" cuda peak {row['cuda_peak_mib']} MiB" if "cuda_peak_mib" in row else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
