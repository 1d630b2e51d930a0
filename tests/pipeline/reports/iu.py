"""The Indiana University chest X-ray reports that torchxrayvision ships, as a report table.

CC BY-NC-ND: read in place from the installed package (never imported: its ``__init__``
imports torch), written only to ``tmp_path``, never copied into the repository. A test that
needs them skips when torchxrayvision is not installed (it is in the ``dev`` extra).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from workflows.bench_negation import iu_archive, iu_reports


def require_iu() -> tuple[tuple[str, str, str], ...]:
    """(report id, findings, impression) of every IU report, or skip the test."""
    if iu_archive() is None:
        pytest.skip("torchxrayvision is not installed (pip install torchxrayvision)")
    return iu_reports()


def write_iu_csv(directory: Path, rows=None) -> Path:
    """The IU reports as a CSV (report_id, findings, impression) in ``directory``."""
    rows = require_iu() if rows is None else rows
    path = Path(directory) / "iu_reports.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["report_id", "findings", "impression"])
        w.writerows(rows)
    return path
