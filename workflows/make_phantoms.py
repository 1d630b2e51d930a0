"""make-phantoms --out data/phantoms --patients 8 --seed 0 [--matrix 160]

Writes a deterministic collection of synthetic CT studies, one per patient, as real DICOM series
(with realistic fake identifying values) plus NIfTI label maps and ground-truth JSON:
``OUT/<FAMILY^GIVEN_PID>/CT_<n>/*.dcm``, ``CT_<n>_seg.nii.gz``, ``CT_<n>_seg.json`` and
``CT_<n>_truth.json``. The same seed gives byte-identical files. See :mod:`pipeline.phantoms`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.phantoms import make_phantoms

MAX_PATIENTS = 999
MATRIX_RANGE = (32, 512)


@dataclass(frozen=True)
class PhantomConfig:
    """Validated command-line settings."""

    out: Path
    patients: int = 8
    seed: int = 0
    matrix: int = 160
    workers: int = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make-phantoms",
        description=(
            "Write deterministic synthetic CT studies: DICOM series, NIfTI label maps, ground truth."
        ),
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    p.add_argument("--patients", type=int, default=8, help=f"number of studies, 1..{MAX_PATIENTS}")
    p.add_argument("--seed", type=int, default=0, help="random seed, >= 0")
    p.add_argument(
        "--matrix",
        type=int,
        default=160,
        help=f"in-plane matrix size (rows = columns), {MATRIX_RANGE[0]}..{MATRIX_RANGE[1]}",
    )
    p.add_argument("--workers", type=int, default=1,
                   help="processes (the studies are the same for any count)")
    return p


def parse_config(argv: list[str] | None = None) -> PhantomConfig:
    """Parse and validate ``argv``; a bad value exits (status 2) naming the flag and the value."""
    parser = _parser()
    ns = parser.parse_args(argv)
    if not 1 <= ns.patients <= MAX_PATIENTS:
        parser.error(f"--patients must be between 1 and {MAX_PATIENTS}, got {ns.patients}")
    if ns.seed < 0:
        parser.error(f"--seed must be >= 0, got {ns.seed}")
    if not MATRIX_RANGE[0] <= ns.matrix <= MATRIX_RANGE[1]:
        parser.error(
            f"--matrix must be between {MATRIX_RANGE[0]} and {MATRIX_RANGE[1]}, got {ns.matrix}"
        )
    if ns.workers < 1:
        parser.error(f"--workers must be >= 1, got {ns.workers}")
    if ns.out.exists() and not ns.out.is_dir():
        parser.error(f"--out must be a folder, got existing file {str(ns.out)!r}")
    return PhantomConfig(out=ns.out, patients=ns.patients, seed=ns.seed, matrix=ns.matrix,
                         workers=ns.workers)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    folders = make_phantoms(cfg.out, patients=cfg.patients, seed=cfg.seed, matrix=cfg.matrix,
                            workers=cfg.workers)
    print(f"wrote {len(folders)} phantom studies to {cfg.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
