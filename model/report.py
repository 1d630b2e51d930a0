"""The evaluation report a person reads: ``REPORT.md`` (tables) and ``REPORT.html`` (tables and
plots), both rendered from the report dict that evaluate-model writes as ``REPORT.json``.

``REPORT.html`` is a jinja2 template (``model/templates/report.html.j2``); its plots are PNG files
(matplotlib, Agg, no display) in ``REPORT_files/`` beside it: per-class region accuracy with the
support of each class, a confusion matrix per run, one ROC panel per class, the retrieval R@K
curves; every run of the report (region-aware and the baseline) side by side, counts on every
table. Plot file names are fixed (``roc.png``, ``confusion-1.png``): no label or path reaches a
file name.
"""

from __future__ import annotations

import math
from pathlib import Path

import jinja2
import numpy as np
from matplotlib.figure import Figure

TASKS = ("region_zero_shot", "laterality_zero_shot", "image_zero_shot")
MEASURES = ("accuracy", "balanced_accuracy", "auc")
DIRECTIONS = ("image_to_report", "report_to_image", "region_to_caption", "caption_to_region")
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")  # one per run, in report order
TITLES = {"region_aware": "region-aware", "global_only": "global-only"}
DPI = 100


def runs(report: dict) -> list[str]:
    """The report's run keys (``region_aware``, ``global_only``, ``*_2``), in report order."""
    return [k for k, v in report.items() if isinstance(v, dict) and "retrieval" in v]


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


# -- markdown -------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    """The headline table (one column per run, counts in the last column), then per class."""
    kinds = runs(report)
    first = report[kinds[0]]
    lines = ["| metric | " + " | ".join(kinds) + " | n |", "|---|" + "---|" * (len(kinds) + 1)]
    for name, values, n in headline(report):
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in values) + f" | {n} |")
    lines += ["", "Per class (region zero-shot): support, then each run's accuracy (correct / "
              "support) and one-vs-rest AUC.", "",
              "| label | support | " + " | ".join(f"{k} accuracy | {k} AUC" for k in kinds) + " |",
              "|---|---:|" + "---:|---:|" * len(kinds)]
    for row in per_class(report):
        cells = [f"{_fmt(a)} ({c}) | {_fmt(u)}" for a, c, u in row["runs"]]
        lines.append(f"| {row['label']} | {row['support']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{first['n_images']} images, {first['n_regions']} regions.\n"


def headline(report: dict) -> list[tuple[str, list, str]]:
    """(metric, value per run, count) rows of the headline table."""
    kinds = runs(report)
    rows = []
    for task in TASKS:
        for part, name in ((None, task),
                           ("bilateral_labels", "laterality (bilateral labels only)")):
            if part and task != "laterality_zero_shot":
                continue
            res = [report[k][task] if part is None else report[k][task][part] for k in kinds]
            for m in MEASURES:
                rows.append((f"{name} {m}", [r[m] for r in res], str(res[0]["n"])))
    for d in report[kinds[0]]["retrieval"]:
        res = [report[k]["retrieval"][d] for k in kinds]
        n = f"{res[0]['queries']} queries, gallery {res[0]['gallery']}"
        for m in ("r1", "r5", "r10"):
            rows.append((f"{d} {m.upper()}", [r[m] for r in res], n))
    return rows


def per_class(report: dict) -> list[dict]:
    """Per region label: support and, per run, (accuracy, correct, AUC)."""
    kinds = runs(report)
    zs = [report[k]["region_zero_shot"] for k in kinds]
    out = []
    for c, label in enumerate(zs[0].get("labels", [])):
        support = zs[0]["per_class"]["support"][c]
        if not support:
            continue
        out.append({"label": label, "support": support, "runs": [
            (z["per_class"]["correct"][c] / support, z["per_class"]["correct"][c],
             z["per_class"]["auc"][c]) for z in zs]})
    return out


# -- plots ----------------------------------------------------------------------------------------

def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=DPI)
    return path.name


def plot_per_class(report: dict, path: Path) -> str:
    """Horizontal bars: per label, each run's accuracy; the support printed beside the bars."""
    kinds, rows = runs(report), per_class(report)
    fig = Figure(figsize=(7, 1 + 0.32 * len(rows) * len(kinds)), layout="constrained")
    ax = fig.add_subplot()
    h = 0.8 / len(kinds)
    y = np.arange(len(rows))
    for j, k in enumerate(kinds):
        ax.barh(y + j * h, [r["runs"][j][0] for r in rows], h, color=COLOURS[j],
                label=TITLES.get(k, k))
    for i, r in enumerate(rows):
        ax.text(1.01, i + h * (len(kinds) - 1) / 2, f"n={r['support']}", va="center", fontsize=8)
    ax.set_yticks(y + h * (len(kinds) - 1) / 2, [r["label"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("region zero-shot accuracy (correct / support)")
    fig.legend(loc="outside upper center", ncols=len(kinds), fontsize=8)
    return _save(fig, path)


def plot_confusion(zs: dict, title: str, path: Path) -> str:
    """Rows = true label, columns = predicted; colour = row fraction, counts written in."""
    cm = np.asarray(zs["confusion"])
    keep = np.flatnonzero(cm.sum(0) + cm.sum(1))  # labels that occur or are predicted
    cm, labels = cm[np.ix_(keep, keep)], [zs["labels"][i] for i in keep]
    side = 2.5 + 0.38 * len(labels)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.add_subplot()
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.7, label="fraction of the true label's regions")
    return _save(fig, path)


def plot_roc(report: dict, path: Path) -> str:
    """One panel per label with both sides (positives and negatives): each run's ROC curve."""
    kinds = runs(report)
    zs = [report[k]["region_zero_shot"] for k in kinds]
    labels = [(c, lab) for c, lab in enumerate(zs[0].get("labels", []))
              if any(z["roc"][c] for z in zs)]
    cols = min(4, max(len(labels), 1))
    rows = max(math.ceil(len(labels) / cols), 1)
    fig = Figure(figsize=(2.6 * cols, 2.5 * rows), layout="constrained")
    for i, (c, lab) in enumerate(labels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        for j, z in enumerate(zs):
            if z["roc"][c]:
                ax.plot(z["roc"][c]["fpr"], z["roc"][c]["tpr"], color=COLOURS[j], lw=1.2,
                        label=f"{TITLES.get(kinds[j], kinds[j])} {z['roc'][c]['auc']:.2f}")
        ax.set_title(f"{lab} (n={zs[0]['per_class']['support'][c]})", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="lower right", title="AUC", title_fontsize=6)
        ax.set_aspect("equal")
    fig.supxlabel("false positive rate", fontsize=8)
    fig.supylabel("true positive rate", fontsize=8)
    return _save(fig, path)


def plot_retrieval(report: dict, path: Path) -> str:
    """R@K for K = 1..50 per direction, each run a line."""
    kinds = runs(report)
    fig = Figure(figsize=(10, 2.8), layout="constrained")
    for i, d in enumerate(DIRECTIONS):
        ax = fig.add_subplot(1, len(DIRECTIONS), i + 1)
        for j, k in enumerate(kinds):
            r = report[k]["retrieval"][d]
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], color=COLOURS[j],
                    drawstyle="steps-post", label=TITLES.get(k, k))
        r = report[kinds[0]]["retrieval"][d]
        ax.set_title(f"{d.replace('_', ' ')}\n{r['queries']} queries, gallery {r['gallery']}",
                     fontsize=8)
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 5, 10, 20, 50], ["1", "2", "5", "10", "20", "50"])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("K", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.axes[0].set_ylabel("R@K", fontsize=8)
    fig.axes[0].legend(fontsize=7)
    return _save(fig, path)


# -- html -----------------------------------------------------------------------------------------

def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("model", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def write_html(report: dict, html: Path) -> Path:
    """Write ``html`` and its plots in ``<html stem>_files/``; returns ``html``."""
    files = html.with_name(f"{html.stem}_files")
    files.mkdir(parents=True, exist_ok=True)
    kinds = runs(report)
    plots = {"per_class": plot_per_class(report, files / "per_class.png"),
             "roc": plot_roc(report, files / "roc.png"),
             "retrieval": plot_retrieval(report, files / "retrieval.png"),
             "confusion": [plot_confusion(report[k]["region_zero_shot"], TITLES.get(k, k),
                                          files / f"confusion-{j + 1}.png")
                           for j, k in enumerate(kinds)]}
    page = _env().get_template("report.html.j2").render(
        report=report, kinds=kinds, titles=[TITLES.get(k, k) for k in kinds],
        headline=headline(report), per_class=per_class(report), plots=plots,
        files=files.name, fmt=_fmt)
    html.write_text(page, encoding="utf-8")
    return html
