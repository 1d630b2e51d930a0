"""browse-catalog DIR [--where EXPR] [--html OUT] [--page-size 48] [--limit N]
                     [--check-leakage] [--near-duplicates]

Browses a corpus written by build-corpus: prints summary tables (rows per table, files per
status/reason, regions per split/label/modality, region statistics) and a sample of regions
matching --where (a SQL condition over region and image columns, e.g. "label = 'liver'" or
"area_mm2 > 100 AND split = 'test'"). --html OUT writes a static paginated gallery of the
matching regions (mask and box drawn on each thumbnail) and prints the path of its index.html.

    browse-catalog data/corpus
    browse-catalog data/corpus --where "label = 'liver'" --html out/gallery --page-size 48
    browse-catalog data/corpus --check-leakage --near-duplicates
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from catalogs.corpus import Corpus, CorpusError, parse_where
from workflows.usage import UsageError, command_parser, run_command

SAMPLE_COLUMNS = ("region_id", "label", "laterality", "split", "modality", "plane",
                  "slice_index", "area_mm2", "max_diameter_mm", "source", "score",
                  "caption_region")


def _parser() -> argparse.ArgumentParser:
    p = command_parser("browse-catalog", __doc__.split("\n\n")[1],
                       'browse-catalog data/corpus --where "label = \'liver\'" --html out/gallery')
    p.add_argument("dir", type=Path, metavar="DIR", help="corpus directory (has manifest.json)")
    p.add_argument("--where", help="SQL condition on regions + image columns, "
                   "e.g. \"label = 'liver'\"")
    p.add_argument("--html", type=Path, metavar="OUT", help="write the HTML gallery to folder OUT")
    p.add_argument("--page-size", type=int, default=48, help="gallery cards per page")
    p.add_argument("--gallery-order", choices=("mixed", "label"), default="mixed",
                   help="gallery card order: labels round-robin, or grouped by label")
    p.add_argument("--limit", type=int, help="at most N regions (deterministic sample) in the "
                   "printed sample and the gallery (default: 10 printed, all in the gallery)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--check-leakage", action="store_true",
                   help="patients or identical images in more than one split")
    p.add_argument("--near-duplicates", action="store_true",
                   help="near-duplicate images by 64-bit perceptual hash")
    p.add_argument("--max-distance", type=int, default=4,
                   help="Hamming distance (bits) for --near-duplicates")
    p.add_argument("--verify-captions", action="store_true",
                   help="re-derive caption facts from masks, geometry and pixels; exit 1 on "
                   "any disagreement, or when a text-only classifier tells captions from "
                   "their negatives (see --blind-threshold)")
    p.add_argument("--blind-threshold", type=float, default=0.60,
                   help="with --verify-captions: exit 1 when the text-only classifier's "
                   "balanced accuracy (captions vs negatives, grouped by image) exceeds this")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document instead of tables: the summary, the sample and "
                   "each requested check's result")
    return p


def _table(title: str, df: pl.DataFrame) -> None:
    print(f"\n## {title}")
    with pl.Config(tbl_rows=200, tbl_cols=20, fmt_str_lengths=40, tbl_hide_dataframe_shape=True,
                   tbl_width_chars=160):
        print(df)


def _counts_frame(counts: dict, key: str) -> pl.DataFrame:
    return pl.DataFrame({key: list(counts), "n": list(counts.values())},
                        schema={key: pl.String, "n": pl.Int64})


@dataclass(frozen=True)
class BrowseConfig:
    """What to print, check and write about one corpus (validated by :meth:`validate`)."""

    dir: Path  # corpus directory (has manifest.json)
    where: str | None = None  # SQL condition on regions + image columns; None: all regions
    html: Path | None = None  # write the HTML gallery to this folder
    page_size: int = 48  # gallery cards per page, >= 1
    gallery_order: str = "mixed"  # "mixed" (labels round-robin) or "label" (grouped)
    limit: int | None = None  # at most this many sampled regions; None: 10 printed, all in HTML
    seed: int = 0  # sampling seed
    check_leakage: bool = False  # patients or identical images in more than one split → exit 1
    near_duplicates: bool = False  # list near-duplicate image pairs (perceptual hash)
    max_distance: int = 4  # Hamming distance (bits, 0..64) for near_duplicates
    verify_captions: bool = False  # re-derive caption facts; disagreement → exit 1
    blind_threshold: float = 0.60  # blind classifier's balanced accuracy above this → exit 1
    as_json: bool = False  # print the summary as JSON instead of tables

    def validate(self) -> None:
        """Raise ValueError naming the first bad flag and its value (the corpus itself and
        --where are checked when it is opened, by :func:`open_corpus`)."""
        if self.page_size < 1:
            raise ValueError(f"--page-size {self.page_size}: must be >= 1")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit {self.limit}: must be >= 0")
        if not 0.5 <= self.blind_threshold <= 1.0:
            raise ValueError(f"--blind-threshold {self.blind_threshold}: must be in [0.5, 1]")
        if not 0 <= self.max_distance <= 64:
            raise ValueError(f"--max-distance {self.max_distance}: must be between 0 and 64")
        if self.html is not None and self.html.exists() and not self.html.is_dir():
            raise ValueError(f"--html {self.html}: exists and is not a folder")
        if not self.dir.is_dir():
            raise ValueError(f"DIR {self.dir}: not a directory")
        if not (self.dir / "manifest.json").is_file():
            raise ValueError(f"DIR {self.dir}: no manifest.json (not a corpus written by "
                             "build-corpus, or the build has not committed a shard yet)")


def config_from_args(args: argparse.Namespace) -> BrowseConfig:
    """Map parsed flags to the typed config (the only place that sees the namespace)."""
    return BrowseConfig(dir=args.dir, where=args.where, html=args.html,
                        page_size=args.page_size, gallery_order=args.gallery_order,
                        limit=args.limit, seed=args.seed,
                        check_leakage=args.check_leakage, near_duplicates=args.near_duplicates,
                        max_distance=args.max_distance, verify_captions=args.verify_captions,
                        as_json=args.json, blind_threshold=args.blind_threshold)


def open_corpus(cfg: BrowseConfig) -> Corpus:
    """Open DIR and resolve --where against its columns; :class:`UsageError` naming the flag
    when either is bad (what the manifest lists stays out of the message)."""
    try:
        corpus = Corpus.open(cfg.dir)
    except CorpusError:
        raise UsageError(f"DIR {cfg.dir}: not a readable corpus (manifest.json unreadable, or "
                         "a file it lists is missing)") from None
    if cfg.where is not None:
        try:
            parse_where(cfg.where, corpus.regions_with_images())
        except CorpusError as e:
            raise UsageError(f"--where: {e}") from None
    return corpus


def browse(cfg: BrowseConfig) -> int:
    """Print the summary and sample, run the requested checks, write the gallery. Exit status
    0, or 1 when a check (--check-leakage, --verify-captions) finds a problem. With --json,
    stdout is one JSON document (the summary's keys, plus ``sample`` and one key per check
    and the gallery); the tables are not printed."""
    corpus = open_corpus(cfg)
    try:
        if cfg.as_json:
            doc = corpus.summary()
            doc["sample"] = _sample(corpus, cfg)[1].to_dicts()
            status, checks = _run_checks(corpus, cfg)
            doc.update(_checks_json(checks))
            if cfg.html:
                doc["gallery"] = str(_write_gallery(corpus, cfg))
            print(json.dumps(doc, indent=1, default=str))
            return status
        _print_summary(corpus, cfg.where)
        _print_sample(corpus, cfg)
        status, checks = _run_checks(corpus, cfg)
        _print_checks(checks, cfg.max_distance)
        if cfg.html:
            print(f"\ngallery: {_write_gallery(corpus, cfg)}")
    except (CorpusError, pl.exceptions.PolarsError) as e:  # e.g. a type error only seen on data
        if cfg.where is None:
            raise UsageError(f"DIR {cfg.dir}: unreadable corpus ({type(e).__name__})") from None
        raise UsageError(f"--where {cfg.where!r}: fails on this corpus's data "
                         f"({type(e).__name__}; e.g. a column compared with a value of "
                         "another type)") from None
    return status


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), config_from_args, browse, argv)


def _print_summary(corpus: Corpus, where: str | None) -> None:
    summary = corpus.summary()
    print(f"# corpus {corpus.root}  (pipeline {summary['pipeline_version']}, "
          f"{summary['shards']} shards, complete: {summary['complete']})")
    rows = pl.DataFrame({"table": list(summary["rows"]),
                         "rows": list(summary["rows"].values()),
                         "manifest_rows": list(summary["manifest_rows"].values())})
    _table("rows per table", rows)
    sr = summary["files"]["by_status_reason"]
    _table("files by status / reason", pl.DataFrame(
        {"status": [k.split("/", 1)[0] for k in sr], "reason": [k.split("/", 1)[1] for k in sr],
         "n": list(sr.values())}, schema={"status": pl.String, "reason": pl.String,
                                           "n": pl.Int64}))
    _table("patients by split", _counts_frame(summary["patients"]["by_split"], "split"))
    _table("regions by split", _counts_frame(summary["regions"]["by_split"], "split"))
    _table("regions by modality", _counts_frame(summary["regions"]["by_modality"], "modality"))
    _table("regions by label", _counts_frame(summary["regions"]["by_label"], "label"))
    _table("region statistics (label, modality, split)" + (f" where {where}" if where else ""),
           corpus.region_stats(where=where).drop("area_mm2_sum", "area_mm2_median"))


def _sample(corpus: Corpus, cfg: BrowseConfig) -> tuple[int, pl.DataFrame]:
    """(regions matching --where, the deterministic sample of them: SAMPLE_COLUMNS)."""
    lf = corpus.filter(cfg.where) if cfg.where is not None else corpus.regions_with_images()
    matching = int(lf.select(pl.len()).collect().item())
    n = cfg.limit if cfg.limit is not None else 10
    sample = corpus.sample(n, seed=cfg.seed, where=cfg.where)
    return matching, sample.select([c for c in SAMPLE_COLUMNS if c in sample.columns])


def _print_sample(corpus: Corpus, cfg: BrowseConfig) -> None:
    matching, sample = _sample(corpus, cfg)
    _table(f"sample of {sample.height} of {matching} matching regions"
           + (f" where {cfg.where}" if cfg.where else ""), sample)


def _run_checks(corpus: Corpus, cfg: BrowseConfig) -> tuple[int, dict]:
    """The requested corpus checks: (1 when one of them fails, else 0; {check: result}) with
    results ``leakage`` (dict), ``near_duplicates`` (DataFrame), ``caption_check`` (dict).
    A failure is also said on stderr."""
    from catalogs.verify import check_leakage, near_duplicates, verify_captions

    status, out = 0, {}
    if cfg.check_leakage:
        out["leakage"] = check_leakage(corpus)
        if not out["leakage"]["ok"]:
            print("browse-catalog: LEAK: patients or identical images span splits",
                  file=sys.stderr)
            status = 1
    if cfg.near_duplicates:
        out["near_duplicates"] = near_duplicates(corpus, max_distance=cfg.max_distance)
    if cfg.verify_captions:
        out["caption_check"] = verify_captions(corpus, blind_threshold=cfg.blind_threshold)
        if not out["caption_check"]["ok"]:
            print("browse-catalog: captions disagree with the re-derived facts"
                  if out["caption_check"]["problems"] else "browse-catalog: a text-only "
                  "classifier tells captions from their negatives (blind balanced accuracy "
                  "above --blind-threshold)", file=sys.stderr)
            status = 1
    return status, out


def _near_duplicate_rows(pairs: pl.DataFrame) -> pl.DataFrame:
    return pairs.select("image_id_a", "image_id_b", "distance", "split_a", "split_b",
                        "same_patient").head(50)


def _checks_json(checks: dict) -> dict:
    """The check results as JSON-ready values (the first 50 near-duplicate pairs, the first 10
    caption disagreements)."""
    out = dict(checks)
    if "near_duplicates" in checks:
        pairs = checks["near_duplicates"]
        out["near_duplicates"] = {
            "pairs": pairs.height,
            "cross_split": int(pairs["cross_split"].sum()) if pairs.height else 0,
            "first_pairs": _near_duplicate_rows(pairs).to_dicts()}
    if "caption_check" in checks:
        report = checks["caption_check"]
        out["caption_check"] = {**{k: v for k, v in report.items() if k != "problems"},
                                "problems": report["problems"][:10]}
    return out


def _print_checks(checks: dict, max_distance: int) -> None:
    if "leakage" in checks:
        print("\n## leakage")
        print(json.dumps(checks["leakage"], indent=1))
    if "near_duplicates" in checks:
        pairs = checks["near_duplicates"]
        cross = int(pairs["cross_split"].sum()) if pairs.height else 0
        _table(f"near-duplicate image pairs (pHash, <= {max_distance} bits): "
               f"{pairs.height}, of which {cross} across splits", _near_duplicate_rows(pairs))
    if "caption_check" in checks:
        report = checks["caption_check"]
        print("\n## caption check")
        print(json.dumps({k: v for k, v in report.items() if k != "problems"}, indent=1))
        for problem in report["problems"][:10]:
            print("  disagreement:", json.dumps(problem, default=str)[:300])


def _write_gallery(corpus: Corpus, cfg: BrowseConfig) -> Path:
    """Write the HTML gallery to --html; the path of its index.html."""
    from catalogs.gallery import write_gallery

    return write_gallery(corpus, cfg.html, where=cfg.where, page_size=cfg.page_size,
                         limit=cfg.limit, seed=cfg.seed, order=cfg.gallery_order)


if __name__ == "__main__":
    sys.exit(main())
