"""python -m workflows.build_tokenizer --corpus DIR [--preset tiny|base] [--vocab-size N]

Builds the corpus's WordPiece tokenizer once, from the caption columns of the train split only
(no image bytes), and stores it with the corpus as ``DIR/tokenizer/wordpiece<N>-v1/``
(``tokenizer.json`` + ``meta.json`` naming the committed shards it was built from), written to a
temporary folder and renamed into place. train-model then uses it instead of building one, so
no rank waits for it. Rerunning is a no-op while the committed shards are the same.

    python -m workflows.build_tokenizer --corpus data/corpus --preset base
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from workflows.usage import command_parser, run_command


def _parser() -> argparse.ArgumentParser:
    p = command_parser("build-tokenizer", __doc__.split("\n\n")[1],
                       "python -m workflows.build_tokenizer --corpus data/corpus --preset base")
    p.add_argument("--corpus", type=Path, required=True, help="corpus folder (build-corpus --out)")
    p.add_argument("--preset", default="tiny",
                   help="the preset whose text.vocab_size is built (tiny | base | a JSON path)")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (overrides the preset's)")
    return p


@dataclass(frozen=True)
class TokenizerJob:
    corpus: Path  # corpus folder with a manifest
    vocab_size: int  # WordPiece vocabulary size (the train-model preset's text.vocab_size)


def config_from_args(args: argparse.Namespace) -> TokenizerJob:
    if not (args.corpus / "manifest.json").is_file():
        raise ValueError(f"--corpus {args.corpus}: no manifest.json (not a build-corpus output)")
    from model.config import load_preset

    vocab = args.vocab_size if args.vocab_size is not None else \
        load_preset(args.preset).text.vocab_size
    if vocab < 16:
        raise ValueError(f"--vocab-size {vocab}: too small (at least 16)")
    return TokenizerJob(args.corpus, vocab)


def build(job: TokenizerJob) -> int:
    from model.tokenizer import build_stored

    folder, built = build_stored(job.corpus, job.vocab_size)
    meta = json.loads((folder / "meta.json").read_text())
    print(json.dumps({"tokenizer": str(folder), "built": built, "vocab_size": meta["vocab_size"],
                      "captions": meta["captions"], "shards": len(meta["source"]["shards"])},
                     indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), config_from_args, build, argv)


if __name__ == "__main__":
    sys.exit(main())
