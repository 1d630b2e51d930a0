"""make-phantoms --out data/phantoms --patients 8 --seed 0 [--matrix 160]

Writes a deterministic collection of synthetic CT studies, one per patient, as real DICOM series
(with realistic fake identifying values) plus NIfTI label maps and ground-truth JSON:
``OUT/<FAMILY^GIVEN_PID>/CT_<n>/*.dcm``, ``CT_<n>_seg.nii.gz``, ``CT_<n>_seg.json`` and
``CT_<n>_truth.json``. The same seed gives byte-identical files. See :mod:`pipeline.phantoms.studies`.
OUT must be empty (or new): a folder that holds anything is refused, so that studies of two
runs never mix; --overwrite replaces an earlier collection's studies (and refuses to delete
anything make-phantoms did not write).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.phantoms.studies import make_phantoms
from workflows.usage import command_parser, run_command

MAX_PATIENTS = 999
MATRIX_RANGE = (32, 512)


@dataclass(frozen=True)
class PhantomConfig:
    """What to write (validated by :meth:`validate`)."""

    out: Path  # output folder, created if missing
    patients: int = 8  # number of studies, 1..MAX_PATIENTS
    seed: int = 0  # random seed, >= 0 (same seed → byte-identical files)
    matrix: int = 160  # in-plane matrix size (rows = columns), within MATRIX_RANGE
    workers: int = 1  # processes (the studies are the same for any count)
    overwrite: bool = False  # replace the studies of an earlier run in ``out`` (else: refused)

    def validate(self) -> None:
        """Raise ValueError naming the first bad flag and its value."""
        if not 1 <= self.patients <= MAX_PATIENTS:
            raise ValueError(f"--patients {self.patients}: must be between 1 and {MAX_PATIENTS}")
        if self.seed < 0:
            raise ValueError(f"--seed {self.seed}: must be >= 0")
        if not MATRIX_RANGE[0] <= self.matrix <= MATRIX_RANGE[1]:
            raise ValueError(f"--matrix {self.matrix}: must be between {MATRIX_RANGE[0]} and "
                             f"{MATRIX_RANGE[1]}")
        if self.workers < 1:
            raise ValueError(f"--workers {self.workers}: must be >= 1")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out}: exists and is not a folder")
        self._check_out_empty()

    def _check_out_empty(self) -> None:
        """OUT new or empty; with --overwrite, holding only studies make-phantoms wrote."""
        entries = list(self.out.iterdir()) if self.out.is_dir() else []
        if entries and not self.overwrite:
            raise ValueError(f"--out {self.out}: not empty; pass --overwrite to replace an "
                             "earlier collection there, or choose a new folder")
        if any(not _is_study(p) for p in entries):
            raise ValueError(f"--overwrite: --out {self.out} holds files make-phantoms did not "
                             "write; not deleting them (choose a new folder)")


def _is_study(path: Path) -> bool:
    """A patient folder as make-phantoms writes it (``FAMILY^GIVEN_PID``) holding only its
    ``CT_<n>`` series and their sidecars (or, from a killed run, part of them)."""
    if path.is_symlink() or not path.is_dir() or "^" not in path.name:
        return False
    return all(p.name.startswith("CT_") for p in path.iterdir())


def _parser() -> argparse.ArgumentParser:
    p = command_parser(
        "make-phantoms",
        "Write deterministic synthetic CT studies: DICOM series, NIfTI label maps, ground truth.",
        "make-phantoms --out data/phantoms --patients 8 --seed 0",
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace the studies of an earlier run in --out (without it a "
                   "non-empty --out is refused)")
    return p


def config_from_args(ns: argparse.Namespace) -> PhantomConfig:
    """Map parsed flags to the typed config (the only place that sees the namespace)."""
    return PhantomConfig(out=ns.out, patients=ns.patients, seed=ns.seed, matrix=ns.matrix,
                         workers=ns.workers, overwrite=ns.overwrite)


def write_phantoms(cfg: PhantomConfig) -> int:
    """Write the studies and say where they went; for --overwrite, first delete the earlier
    studies (validated to be all that OUT holds)."""
    if cfg.overwrite and cfg.out.is_dir():
        for study in cfg.out.iterdir():
            shutil.rmtree(study)
    folders = make_phantoms(cfg.out, patients=cfg.patients, seed=cfg.seed, matrix=cfg.matrix,
                            workers=cfg.workers)
    print(f"wrote {len(folders)} phantom studies to {cfg.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), config_from_args, write_phantoms, argv)


if __name__ == "__main__":
    raise SystemExit(main())
