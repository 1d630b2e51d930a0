"""The corpus's tokenizer: WordPiece built once per corpus from the caption COLUMNS only and
stored with the corpus, so training never waits for it.

Layout: ``CORPUS/tokenizer/<version>/tokenizer.json`` and ``meta.json``; ``<version>`` is
``wordpiece<vocab size>-v<TOKENIZER_FORMAT>`` (one folder per vocabulary size: presets differ).
``meta.json`` names what it was built from: the committed shard names of the manifest and a
sha256 over them (``source``), the format, the vocabulary size and the caption count. A folder is
written to a temporary name and renamed into place (a crash leaves the previous one or none).

Captions come from :func:`caption_texts`, which reads only caption columns (never the image
bytes) of the train split, filtered on read, plus the label-vocabulary prompts: the same texts
the trainer's own fallback would see.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from model import captions as cap
from model.config import RunConfig
from model.data import IMAGE_CAPTIONS, CorpusIndex
from model.text_tower import load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)
TOKENIZER_FORMAT = 1  # bump when the vocabulary rule (train_tokenizer) changes
STORE = "tokenizer"
IMAGE_TEXT_COLS = ["image_id", "split", "modality", "plane"]
REGION_TEXT_COLS = ["image_id", "split", "label", "laterality"]
REGION_TEXT_CAPTIONS = ["caption_region", "negatives"]


def version_name(vocab_size: int) -> str:
    return f"wordpiece{int(vocab_size)}-v{TOKENIZER_FORMAT}"


def stored_dir(corpus: Path, vocab_size: int) -> Path:
    """Where the corpus's tokenizer for ``vocab_size`` lives (whether or not it exists)."""
    return Path(corpus) / STORE / version_name(vocab_size)


def source_of(corpus: CorpusIndex) -> dict:
    """The committed shards a tokenizer is built from (names relative to the corpus)."""
    names = sorted(Path(img).name for img, _ in corpus.shards)
    return {"shards": names, "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}


def find_stored(corpus: Path, vocab_size: int) -> Path | None:
    """The stored tokenizer folder for ``vocab_size`` when it is complete, else None."""
    folder = stored_dir(corpus, vocab_size)
    if (folder / "tokenizer.json").is_file() and (folder / "meta.json").is_file():
        return folder
    return None


def _read(path, columns: list[str], split: str):
    """Only ``columns`` of ``path``, rows of ``split`` (a predicate on read)."""
    return pq.read_table(path, columns=columns, filters=[("split", "==", split)])


def caption_texts(corpus: CorpusIndex, split: str = "train") -> Iterator[str]:
    """Every caption of ``split`` (summary, report, region captions, negatives), plus the
    label-vocabulary prompts, reading caption columns only (no image bytes)."""
    for lab, sides in corpus.sides.items():
        yield from cap.label_prompts(lab, sides, corpus.prompt)
        yield from (corpus.prompt(lab, s) for s in ("left", "right"))
    icols = IMAGE_TEXT_COLS + (IMAGE_CAPTIONS if corpus.image_captions else [])
    rcols = REGION_TEXT_COLS + (REGION_TEXT_CAPTIONS if corpus.region_captions else [])
    for images, regions in corpus.shards:
        by_image: dict[str, list[dict]] = {}
        if regions is not None:
            for r in _read(regions, rcols, split).to_pylist():
                by_image.setdefault(r["image_id"], []).append(r)
        for row in _read(images, icols, split).to_pylist():
            regs = by_image.get(row["image_id"], [])
            caps = [r.get("caption_region") or cap.region_caption(r["label"], r["laterality"])
                    for r in regs]
            yield row.get("caption_summary") or cap.image_summary(
                [r["label"] for r in regs], row["modality"], row["plane"])
            yield row.get("caption_report") or cap.image_report(caps, row["modality"],
                                                                row["plane"])
            yield from caps
            for r in regs:
                yield from (r.get("negatives") or [])


def build_stored(corpus_dir: Path, vocab_size: int) -> tuple[Path, bool]:
    """(folder, built?) of the corpus's tokenizer for ``vocab_size``: kept when one built from
    the same committed shards exists, else built from the captions and renamed into place."""
    corpus = CorpusIndex.open(corpus_dir)
    source = source_of(corpus)
    final = stored_dir(corpus_dir, vocab_size)
    if find_stored(corpus_dir, vocab_size):
        meta = json.loads((final / "meta.json").read_text())
        if meta.get("source", {}).get("sha256") == source["sha256"]:
            return final, False
    # not named ``.*.tmp-*``: build-corpus removes such files in the corpus's folders
    for stale in final.parent.glob(f".{final.name}-building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}-building-{os.getpid()}")
    count = 0

    def counted():
        nonlocal count
        for t in caption_texts(corpus):
            count += 1
            yield t

    train_tokenizer(counted(), tmp, vocab_size)
    meta = {"format": TOKENIZER_FORMAT, "version": final.name, "vocab_size": int(vocab_size),
            "captions": count, "split": "train", "source": source}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    old = final.with_name(f".{final.name}-old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final, True


def build_in_memory(corpus: CorpusIndex, vocab_size: int, scratch: Path):
    """A tokenizer built from the corpus captions into ``scratch`` (a folder of this process)
    and loaded: deterministic, so every rank that builds it gets the same vocabulary."""
    return load_tokenizer(train_tokenizer(caption_texts(corpus), scratch, vocab_size).parent)


def run_tokenizer(corpus: CorpusIndex, cfg: RunConfig, run: Path, rank: int, resume: bool):
    """The run's tokenizer, saved by rank 0 as ``RUN/tokenizer``. Every rank gets it itself (no collective): from the resumed run, the pretrained text
    folder, the corpus's stored tokenizer, or (none stored) by building it from the captions."""
    folder = run / "tokenizer"
    if resume and (folder / "tokenizer.json").exists():
        return load_tokenizer(folder)
    if cfg.text.weights:
        tok = load_tokenizer(Path(cfg.text.weights))
        if rank == 0:
            _save_run_tokenizer(folder, lambda tmp: tok.save_pretrained(str(tmp)))
        return tok
    stored = find_stored(corpus.root, cfg.text.vocab_size)
    if stored is not None:
        if rank == 0:
            _save_run_tokenizer(folder, lambda tmp: shutil.copytree(stored, tmp))
        return load_tokenizer(stored)
    log.warning("no tokenizer stored with the corpus for this vocabulary size: every rank "
                "builds it from the caption columns (python -m workflows.build_tokenizer "
                "stores it once)")
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        tok = build_in_memory(corpus, cfg.text.vocab_size, Path(tmp))
        if rank == 0:
            _save_run_tokenizer(folder, lambda t: shutil.copytree(tmp, t))
    return tok


def _save_run_tokenizer(folder: Path, write) -> None:
    """``write(temporary folder)``, then rename it to ``folder`` (replacing an older one)."""
    tmp = folder.with_name(f".tokenizer.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
