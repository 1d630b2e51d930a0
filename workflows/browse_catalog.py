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
from pathlib import Path

import polars as pl

from catalogs.corpus import Corpus, CorpusError, parse_where

SAMPLE_COLUMNS = ("region_id", "label", "laterality", "split", "modality", "plane",
                  "slice_index", "area_mm2", "max_diameter_mm", "source", "score",
                  "caption_region")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="browse-catalog", description=__doc__.split("\n\n")[1])
    p.add_argument("dir", type=Path, metavar="DIR", help="corpus directory (has manifest.json)")
    p.add_argument("--where", help="SQL condition on regions + image columns, "
                   "e.g. \"label = 'liver'\"")
    p.add_argument("--html", type=Path, metavar="OUT", help="write the HTML gallery to folder OUT")
    p.add_argument("--page-size", type=int, default=48, help="gallery cards per page")
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
                   "any disagreement")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead")
    return p


def _table(title: str, df: pl.DataFrame) -> None:
    print(f"\n## {title}")
    with pl.Config(tbl_rows=200, tbl_cols=20, fmt_str_lengths=40, tbl_hide_dataframe_shape=True,
                   tbl_width_chars=160):
        print(df)


def _counts_frame(counts: dict, key: str) -> pl.DataFrame:
    return pl.DataFrame({key: list(counts), "n": list(counts.values())},
                        schema={key: pl.String, "n": pl.Int64})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.page_size < 1:
        print(f"browse-catalog: error: --page-size must be >= 1, got {args.page_size}",
              file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 0:
        print(f"browse-catalog: error: --limit must be >= 0, got {args.limit}", file=sys.stderr)
        return 2
    try:
        corpus = Corpus.open(args.dir)
    except CorpusError as e:
        print(f"browse-catalog: error: DIR: {e}", file=sys.stderr)
        return 2
    if args.where is not None:
        try:
            parse_where(args.where, corpus.regions_with_images())
        except CorpusError as e:
            print(f"browse-catalog: error: --where: {e}", file=sys.stderr)
            return 2
    try:
        return _run(corpus, args)
    except CorpusError as e:
        print(f"browse-catalog: error: {e}", file=sys.stderr)
        return 2
    except pl.exceptions.PolarsError as e:  # e.g. a type error only seen while evaluating
        print(f"browse-catalog: error: --where {args.where!r}: {str(e).splitlines()[0]}",
              file=sys.stderr)
        return 2


def _run(corpus: Corpus, args: argparse.Namespace) -> int:
    summary = corpus.summary()
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
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
        _table("regions by modality", _counts_frame(summary["regions"]["by_modality"],
                                                    "modality"))
        _table("regions by label", _counts_frame(summary["regions"]["by_label"], "label"))
        _table("region statistics (label, modality, split)"
               + (f" where {args.where}" if args.where else ""),
               corpus.region_stats(where=args.where).drop("area_mm2_sum", "area_mm2_median"))

    lf = corpus.filter(args.where) if args.where is not None else corpus.regions_with_images()
    matching = int(lf.select(pl.len()).collect().item())
    n = args.limit if args.limit is not None else 10
    sample = corpus.sample(n, seed=args.seed, where=args.where)
    cols = [c for c in SAMPLE_COLUMNS if c in sample.columns]
    _table(f"sample of {sample.height} of {matching} matching regions"
           + (f" where {args.where}" if args.where else ""), sample.select(cols))

    status = 0
    if args.check_leakage:
        from catalogs.verify import check_leakage

        report = check_leakage(corpus)
        print("\n## leakage")
        print(json.dumps(report, indent=1))
        if not report["ok"]:
            print("browse-catalog: LEAK: patients or identical images span splits",
                  file=sys.stderr)
            status = 1
    if args.near_duplicates:
        from catalogs.verify import near_duplicates

        pairs = near_duplicates(corpus, max_distance=args.max_distance)
        cross = int(pairs["cross_split"].sum()) if pairs.height else 0
        _table(f"near-duplicate image pairs (pHash, <= {args.max_distance} bits): "
               f"{pairs.height}, of which {cross} across splits",
               pairs.select("image_id_a", "image_id_b", "distance", "split_a", "split_b",
                            "same_patient").head(50))
    if args.verify_captions:
        from catalogs.verify import verify_captions

        report = verify_captions(corpus)
        print("\n## caption check")
        print(json.dumps({k: v for k, v in report.items() if k != "problems"}, indent=1))
        for problem in report["problems"][:10]:
            print("  disagreement:", json.dumps(problem, default=str)[:300])
        if not report["ok"]:
            print("browse-catalog: captions disagree with the re-derived facts", file=sys.stderr)
            status = 1
    if args.html:
        from catalogs.gallery import write_gallery

        index = write_gallery(corpus, args.html, where=args.where, page_size=args.page_size,
                              limit=args.limit, seed=args.seed)
        print(f"\ngallery: {index}")
    return status


if __name__ == "__main__":
    sys.exit(main())
