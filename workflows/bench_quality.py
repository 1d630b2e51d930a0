"""python -m workflows.bench_quality --corpus C --out DIR [--seeds 0,1,2] [--steps 320] [--preset tiny]
[--kinds region_aware,global_only]; python -m workflows.bench_quality --corpus C --probe RUN [RUN ...]

Region-aware against global-only over several seeds (issues 20 and 23): for each seed, trains
both (train-model's own ``train``, ``--preset``, ``--steps``), evaluates each on the held-out
``--split`` as evaluate-model does, and scores the region-aware model's hard negatives: the
fraction of regions with stored negatives whose caption scores above all of them (cosine of the
region and text embeddings), and pairwise. Prints one JSON line per run, then a JSON summary
with the mean and sample standard deviation of every metric per model (what
docs/benchmarks.md tabulates). Runs go to DIR/<kind>_s<seed>; rerunning overwrites them.

``--probe`` trains nothing: for each given run it asks whether image zero-shot is limited by
the image or by the text side (issue 20) and prints one JSON line: the macro AUC with
evaluate-model's label prompts, the same with each label's prompt replaced by the centroid of
the train split's image summaries of images that hold the label (text that ``text_proj`` was
trained on), the mean cosine of a label's prompt with that centroid, and the mean cosine
between the prompts of two labels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see workflows/train_model.py

KINDS = ("region_aware", "global_only")
METRICS = ("img_zs_acc", "img_zs_auc", "i2r_R5", "i2r_R10", "r2i_R5", "r2i_R10", "reg_zs_acc")


def headline(m: dict) -> dict:
    """The image-level and region-level numbers of an evaluate_run result."""
    r = m["retrieval"]
    return {"img_zs_acc": m["image_zero_shot"]["accuracy"],
            "img_zs_auc": m["image_zero_shot"]["auc"],
            "i2r_R5": r["image_to_report"]["r5"], "i2r_R10": r["image_to_report"]["r10"],
            "r2i_R5": r["report_to_image"]["r5"], "r2i_R10": r["report_to_image"]["r10"],
            "reg_zs_acc": m["region_zero_shot"]["accuracy"]}


def negatives_scores(run: Path, corpus, split: str) -> dict:
    """Caption above all its stored negatives / above each, over the regions with any."""
    import numpy as np
    import pyarrow.parquet as pq

    from model.checkpoint import load_run
    from model.evaluate import embed_split, embed_texts
    from pipeline.write import committed_files

    model, tok, cfg = load_run(run)
    e = embed_split(model, tok, corpus, split, "cpu")
    stored = {}
    for f in committed_files(corpus.root, "regions"):
        t = pq.read_table(f, columns=["region_id", "negatives"]).to_pylist()
        stored.update({x["region_id"]: x["negatives"] or [] for x in t})
    keep = [i for i, rid in enumerate(e["region_id"]) if stored.get(rid)]
    if not keep:
        return {"neg_regions": 0}
    negs = [stored[e["region_id"][i]] for i in keep]

    def unit(a):
        return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-8)

    reg = unit(np.asarray(e["region"])[keep])
    ml = cfg.text.max_len
    cap = unit(embed_texts(model, tok, [e["caption"][i] for i in keep], ml, "cpu", region=True))
    neg = unit(embed_texts(model, tok, [t for n in negs for t in n], ml, "cpu", region=True))
    pos = (reg * cap).sum(1)
    beats_all, pairs, at = [], [], 0
    for k, n in enumerate(negs):
        s = neg[at:at + len(n)] @ reg[k]
        beats_all.append(bool(pos[k] > s.max()))
        pairs += (pos[k] > s).tolist()
        at += len(n)
    return {"neg_regions": len(keep), "caption_beats_all_negatives": float(np.mean(beats_all)),
            "caption_beats_negative_pairwise": float(np.mean(pairs))}


def text_probe(run: Path, corpus, split: str) -> dict:
    """Image zero-shot AUC with the label prompts and with summary centroids (see above)."""
    import numpy as np

    from model import captions as cap
    from model.checkpoint import load_run
    from model.evaluate import _prompt_matrix, embed_split, embed_texts
    from model.metrics import macro_auc

    model, tok, cfg = load_run(run)
    test, train = (embed_split(model, tok, corpus, s, "cpu") for s in (split, "train"))
    labels = corpus.labels
    groups = [cap.label_prompts(lab, corpus.sides.get(lab, []), corpus.prompt) for lab in labels]
    prompts = _prompt_matrix(model, tok, [g + [f"slice showing {p}" for p in g] for g in groups],
                             cfg.text.max_len, "cpu")

    def truth(e):
        return np.array([[lab in set(x) for lab in labels] for x in e["image_labels"]], bool)

    t_test, t_train = truth(test), truth(train)
    keep = [c for c in range(len(labels)) if t_train[:, c].any()]
    summ = embed_texts(model, tok, train["summary"], cfg.text.max_len, "cpu")
    cent = np.stack([summ[t_train[:, c]].mean(0) for c in keep])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    p = prompts[keep]
    pair = p @ p.T
    return {"auc_label_prompts": macro_auc(test["image"] @ p.T, t_test[:, keep]),
            "auc_summary_centroids": macro_auc(test["image"] @ cent.T, t_test[:, keep]),
            "cos_prompt_centroid": float((p * cent).sum(1).mean()),
            "cos_between_prompts": float((pair.sum() - len(p)) / (len(p) * (len(p) - 1)))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_quality", description=__doc__.split("\n\n")[1])
    p.add_argument("--corpus", type=Path, required=True, help="build-corpus output")
    p.add_argument("--out", type=Path, help="folder for the runs")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=320, help="steps per run (the quick start's)")
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--split", default="test", help="held-out split to evaluate")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated models to train")
    p.add_argument("--probe", type=Path, nargs="+", metavar="RUN",
                   help="probe these runs (text side of image zero-shot), train nothing")
    args = p.parse_args(argv)
    if args.out is None and not args.probe:
        raise ValueError("--out: required unless --probe is given")
    kinds = args.kinds.split(",")
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError("--kinds: region_aware and/or global_only")
    import torch

    from model.data import CorpusIndex
    from model.evaluate import evaluate_run
    from model.train import TrainOptions, train

    torch.set_num_threads(args.threads)
    corpus = CorpusIndex.open(args.corpus)
    for run in args.probe or []:
        print(json.dumps({"run": run.name, **text_probe(run, corpus, args.split)}), flush=True)
    if args.probe:
        return 0
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for kind in kinds:
            run = args.out / f"{kind}_s{seed}"
            train(TrainOptions(corpus=args.corpus, out=run, preset=args.preset, seed=seed,
                               steps=args.steps, global_only=kind == "global_only",
                               overwrite=True))
            row = {"kind": kind, "seed": seed, **headline(evaluate_run(run, corpus,
                                                                       split=args.split)[1])}
            if kind == "region_aware":
                row.update(negatives_scores(run, corpus, args.split))
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {}
    for kind in kinds:
        mine = [r for r in rows if r["kind"] == kind]
        keys = [k for k in (*METRICS, "caption_beats_all_negatives",
                            "caption_beats_negative_pairwise") if all(k in r for r in mine)]
        summary[kind] = {k: {"mean": statistics.fmean(r[k] for r in mine),
                             "std": statistics.stdev(r[k] for r in mine) if len(mine) > 1 else 0.0}
                         for k in keys}
    print(json.dumps({"seeds": args.seeds, "steps": args.steps, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
