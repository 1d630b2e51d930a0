"""Training logs: ``RUN/log.jsonl`` (one object per logged step), TensorBoard events in
``RUN/tb/`` when ``tensorboard`` is installed, and ``RUN/loss_curves.png`` (matplotlib, Agg).

On resume, rows logged after the checkpoint's step (written by the killed run after its last
checkpoint) are dropped so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path


class TrainLog:
    def __init__(self, run: Path, rank: int, resume_step: int | None = None):
        self.run, self.rank = Path(run), rank
        self.path = self.run / "log.jsonl"
        self.tb = None
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
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)
        return row

    def close(self) -> None:
        if self.rank != 0:
            return
        if self.tb is not None:
            self.tb.close()
        if self.path.exists():
            plot_losses(read_log(self.path), self.run / "loss_curves.png")


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r if k.endswith("_loss")})
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
    edges = [r["step"] for a, r in zip(rows, rows[1:], strict=False) if r["stage"] != a["stage"]]
    for e in edges:
        ax.axvline(e, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("training losses (dashed: stage changes)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
