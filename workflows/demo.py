"""python -m workflows.demo --out data/demo

The quick start's main job, on the embedded default: writes the phantom collection
(make-phantoms), then builds one corpus (build-corpus) from the phantoms plus the real files
pydicom, nibabel and nilearn ship. Ends by printing where each result is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workflows import build_corpus, make_phantoms
from workflows.sample_sources import package_sources


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--out", type=Path, default=Path("data/demo"), help="results folder")
    p.add_argument("--patients", type=int, default=8, help="phantom studies")
    p.add_argument("--workers", type=int, default=0, help="parallel series (0 = CPU count)")
    args = p.parse_args(argv)
    phantoms, corpus = args.out / "phantoms", args.out / "corpus"
    print(f"== make-phantoms → {phantoms}", file=sys.stderr)
    rc = make_phantoms.main(["--out", str(phantoms), "--patients", str(args.patients)])
    if rc:
        return rc
    sources = [str(phantoms), *map(str, package_sources())]
    print(f"== build-corpus → {corpus}", file=sys.stderr)
    rc = build_corpus.main([*sources, "--out", str(corpus), "--workers", str(args.workers)])
    if rc:
        return rc
    print("\nResults:")
    print(f"  phantom collection   {phantoms}")
    print(f"  corpus tables        {corpus}/files, {corpus}/series, {corpus}/images")
    print(f"  manifest (counts)    {corpus / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
