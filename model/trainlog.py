"""Training logs: ``RUN/log.jsonl`` (one object per logged step; validation rows carry
``"split": "val"``), TensorBoard events in ``RUN/tb/`` when ``tensorboard`` is installed,
``RUN/loss_curves.png`` (matplotlib, Agg) and ``RUN/summary.json`` with a short human summary
on stderr at the end.

While training, rank 0 shows a steps bar on stderr (:mod:`pipeline.run.progress`): live on a
terminal (steps, rate, ETA, the last logged loss, LR and samples/s), plain lines every few
seconds otherwise.

On resume, rows logged after the checkpoint's step (written by the killed run after its last
checkpoint) are dropped so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from pipeline.run.progress import Bar

SUMMARY_FILE = "summary.json"


class TrainLog:
    def __init__(self, run: Path, rank: int, resume_step: int | None = None):
        self.run, self.rank = Path(run), rank
        self.path = self.run / "log.jsonl"
        self.tb = None
        self.bar: Bar | None = None
        self.first_step = resume_step or 0
        if rank != 0:
            return
        if resume_step is not None and self.path.exists():
            rows = [r for r in read_log(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run / "tb"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def tick(self, step: int, total: int) -> None:
        """After each optimizer step (rank 0): the steps bar moves to ``step`` of ``total``."""
        if self.rank != 0:
            return
        if self.bar is None:
            self.bar = Bar("train", total, "step", initial=self.first_step)
        self.bar.update(step)

    def write(self, step: int, stage: int, terms: dict[str, float], counts: dict[str, int],
              **extra) -> dict:
        """Log the mean of each loss term over the steps that computed it since the last row."""
        if self.rank != 0:
            return {}
        row = {"step": step, "stage": stage}
        row.update({k: v / max(counts.get(k, 1), 1) for k, v in sorted(terms.items())})
        row["loss"] = sum(v for k, v in row.items() if k.endswith("_loss"))
        row.update(extra)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            prefix = "val/" if row.get("split") == "val" else ""
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(prefix + k, v, step)
        if self.bar is not None:
            self.bar.update(max(step, self.bar.done), **bar_counts(row))
        return row

    def close(self) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.path.exists():
            rows = read_log(self.path)
            plot_losses(rows, self.run / "loss_curves.png")
            summary = run_summary(rows, self.run)
            (self.run / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
            print(human_summary(summary), file=sys.stderr, flush=True)


def bar_counts(row: dict) -> dict:
    """What the steps bar shows beside the count: a train row's loss, LR and samples/s; a
    validation row's loss and zero-shot accuracy."""
    if row.get("split") == "val":
        out = {"val_loss": row["loss"]}
        if row.get("zero_shot_region_acc") is not None:
            out["val_zero_shot"] = row["zero_shot_region_acc"]
        return out
    out = {"loss": row["loss"]}
    for k, name in (("lr", "lr"), ("samples_per_s", "samples/s")):
        if k in row:
            out[name] = row[k]
    return out


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_summary(rows: list[dict], run: Path) -> dict:
    """``RUN/summary.json``: steps, the last train and validation rows, where the files are."""
    train = [r for r in rows if r.get("split", "train") != "val"]
    val = [r for r in rows if r.get("split") == "val"]
    files = {name: str(run / name) for name in ("ckpt", "log.jsonl", "loss_curves.png", "tb")
             if (run / name).exists()}
    return {"steps": train[-1]["step"] if train else 0,
            "stages": sorted({r["stage"] for r in train}),
            "last": train[-1] if train else None, "last_val": val[-1] if val else None,
            "run": str(run), "files": files}


def human_summary(summary: dict) -> str:
    """A few lines for a person: how far it trained, the last losses, where the run is."""
    lines = [f"train-model: {summary['steps']} steps (stages "
             f"{', '.join(map(str, summary['stages'])) or '-'})"]
    last, val = summary["last"], summary["last_val"]
    if last:
        terms = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k.endswith("_loss"))
        lines.append(f"  last train row: loss {last['loss']:.3f} ({terms})")
    if val:
        acc = val.get("zero_shot_region_acc")
        lines.append(f"  last validation (step {val['step']}): loss {val['loss']:.3f}"
                     + (f", zero-shot region accuracy {acc:.3f}" if acc is not None else ""))
    lines.append(f"  run: {summary['run']}  ({', '.join(summary['files'])}, {SUMMARY_FILE})")
    return "\n".join(lines)


def loss_series(rows: list[dict], key: str, split: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the rows of ``split`` ("train": rows without a split),
    with NaN at rows of that split that lack ``key`` (a stage that does not compute it), so
    the plotted line breaks there instead of bridging the gap."""
    mine = [r for r in rows if r.get("split", "train") == split]
    pts = [(r["step"], float(r[key]) if r.get(key) is not None else math.nan) for r in mine]
    while pts and math.isnan(pts[-1][1]):
        pts.pop()
    while pts and math.isnan(pts[0][1]):
        pts.pop(0)
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_losses(rows: list[dict], out: Path) -> None:
    """Each loss term over steps, one line per term (broken where the term is not computed),
    validation rows as separate dashed series with markers, stage changes as grey lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r if k.endswith("_loss")})
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {k: f"C{i % 10}" for i, k in enumerate(keys)}
    for k in keys:
        xs, ys = loss_series(rows, k, "train")
        if xs:
            ax.plot(xs, ys, color=colors[k], label=k)
        xs, ys = loss_series(rows, k, "val")
        if xs:
            ax.plot(xs, ys, color=colors[k], ls="--", marker="o", ms=3, label=f"val {k}")
    train = [r for r in rows if r.get("split", "train") != "val"]
    edges = [r["step"] for a, r in zip(train, train[1:], strict=False) if r["stage"] != a["stage"]]
    for e in edges:
        ax.axvline(e, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if keys:
        ax.legend(fontsize="small")
    ax.set_title("training losses (grey: stage changes; dashed: validation)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
