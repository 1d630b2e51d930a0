"""build-corpus SOURCE... --out DIR [options]

Walks the SOURCE folders (DICOM series, NIfTI volumes with label maps, RTSTRUCT, DICOM SEG),
de-identifies, assembles canonical volumes, cuts 2D images, proposes regions (--roi labels,
boxes, detector; masks from the SAM-family --segmenter) and commits Parquet shards:
DIR/files/, DIR/series/, DIR/images/, DIR/regions/, DIR/manifest.json and the run summary
DIR/build_summary.json. Progress goes to stderr (a live bar on a terminal). Rerunning the same
command resumes.

    build-corpus data/phantoms --out data/corpus
    build-corpus data/phantoms --out data/corpus2 --roi labels,boxes --segmenter lite-medsam
"""

from __future__ import annotations

import os

# The head's memory (set before Polars or Arrow load; a value the user set is kept): freed
# memory goes back to the system at once instead of staying with the allocator for ~10 s.
# Discovery's frame operations free as much as they keep; measured at 131k files, the head's
# peak is 1.9 KB per file with these, 2.9 without (docs/benchmarks.md, "Discovery and the file
# index"). Polars' jemalloc reads _RJEM_MALLOC_CONF; Arrow's pool ARROW_DEFAULT_MEMORY_POOL.
ALLOCATORS = {"_RJEM_MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0",
              "ARROW_DEFAULT_MEMORY_POOL": "system"}
for _name, _value in ALLOCATORS.items():
    os.environ.setdefault(_name, _value)

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import BuildConfig, ExecConfig, RequestError, SplitConfig, local_gpus
from pipeline.images.slicing import SliceConfig
from pipeline.ingest.read import ReadConfig
from pipeline.roi.regions import RegionConfig
from pipeline.run.build import build
from pipeline.run.progress import VERBOSE_ENV, CommitCounter, count_beside, quiet_ray
from pipeline.storage import join, location, put_bytes
from workflows.usage import UsageError, command_parser, run_command


def _parser() -> argparse.ArgumentParser:
    p = command_parser("build-corpus", __doc__.split("\n\n")[1],
                       'build-corpus data/phantoms --out data/corpus --roi labels,boxes')
    p.add_argument("sources", nargs="*", type=location, metavar="SOURCE",
                   help="folders or files (or s3:// / gs:// prefixes)")
    p.add_argument("--collection", nargs=2, action="append", default=[],
                   metavar=("NAME", "PATH"), help="a public collection in a known layout "
                   "(msd, nnunet_v2, totalsegmentator, brats; see pipeline/ingest/layouts/)")
    p.add_argument("--out", type=location, required=True,
                   help="corpus directory (or an s3:// / gs:// prefix)")
    p.add_argument("--key-file", type=Path, help="de-identification key file "
                   "(default: $REGIONCORPUS_KEY, else ~/.config/regioncorpus/project.key)")
    p.add_argument("--planes", default="axial", help="comma list of axial,coronal,sagittal")
    p.add_argument("--every-k", type=int, default=4, help="also cut every k-th unlabelled slice")
    p.add_argument("--max-side", type=int, default=512, help="longest image side in pixels")
    p.add_argument("--bits", type=int, default=8, choices=(8, 16), help="PNG bit depth")
    p.add_argument("--ct-windows", default="soft_tissue",
                   help="comma list of soft_tissue,lung,bone,brain")
    p.add_argument("--keep-unknown-label-names", action="store_true",
                   help="keep label names (RTSTRUCT ROIName, SEG SegmentLabel, label sidecars) "
                   "that the structure vocabulary does not know instead of structure_<value>. "
                   "RISK: hospitals write patient names, dates and IDs into these names; they "
                   "would be copied into labels, captions and every copy of the corpus")
    p.add_argument("--refuse-gantry-tilt", action="store_true",
                   help="refuse tilted CT stacks (gantry_tilt) instead of resampling them onto an "
                   "orthogonal grid (linear in-plane interpolation per slice, as dcm2niix does)")
    p.add_argument("--allow-burned-in", action="store_true",
                   help="ingest images that may carry burned-in annotations")
    p.add_argument("--min-slices", type=int, default=1, help="fewer slices → quarantined")
    p.add_argument("--roi", default="labels", help="comma list of labels,boxes,detector")
    p.add_argument("--segmenter", default="lite-medsam",
                   help="lite-medsam | sam:PATH | medsam:PATH | otsu | none (boxes/detector routes)")
    p.add_argument("--detector", help="YOLO weights (.pt) for --roi detector (see train-detector)")
    p.add_argument("--det-conf", type=float, default=0.25, help="detector confidence threshold")
    p.add_argument("--det-iou", type=float, default=0.5, help="detector NMS IoU threshold")
    p.add_argument("--box-labels", default="",
                   help="boxes route: only labels containing one of these comma-separated words")
    p.add_argument("--min-area-mm2", type=float, default=4.0,
                   help="label components smaller than this are dropped as fragments")
    p.add_argument("--min-mask-score", type=float, default=0.0,
                   help="drop segmenter masks whose predicted IoU is below this")
    p.add_argument("--device", default="auto",
                   help="model stage device: auto (the default: cuda when this machine, or with "
                   "--address the cluster, has a GPU; else cpu), cpu, cuda, cuda:N or mps; "
                   "checked before any work")
    p.add_argument("--encoder-batch", type=int, default=16,
                   help="images per segmenter encoder call (and YOLO batch), across series; "
                   "1-256, output unchanged")
    p.add_argument("--annotations", action="append", default=[], type=Path, metavar="TABLE",
                   help="annotation table (CSV, Parquet or COCO JSON) of boxes, polygons or "
                   "masks on the stored DICOM frames (points are read, not made regions); "
                   "repeatable (docs/howto.md)")
    p.add_argument("--annotations-format", action="append", default=[], metavar="FORMAT",
                   help="layout of each --annotations table: vindr, rsna, nih, siim, coco or "
                   "custom:SPEC (one for all tables, or one per table in order)")
    p.add_argument("--annotation-merge", default="wbf", choices=("wbf", "readers"),
                   help="several readers' boxes of one finding: fused by weighted box fusion "
                   "(wbf) or kept per reader")
    p.add_argument("--reports", action="append", default=[], metavar="TABLE",
                   help="free-text reports (CSV, Parquet or JSON lines), or 'beside' for a "
                   ".txt report next to each study folder (MIMIC-CXR); repeatable")
    p.add_argument("--reports-key", action="append", default=[], metavar="KIND:COLUMN",
                   help="what joins a report to its study: study:COLUMN (StudyInstanceUID), "
                   "accession:COLUMN or patient_date:PIDCOLUMN,DATECOLUMN (one for all "
                   "tables, or one per table)")
    p.add_argument("--reports-text", action="append", default=[], metavar="COLUMN",
                   help="the report column (sections parsed from it), or "
                   "findings=COLUMN,impression=COLUMN (one for all tables, or one per table)")
    p.add_argument("--caption-seed", type=int, default=0, help="caption phrasing variant seed")
    p.add_argument("--captioner", help="optional hf:LOCAL_PATH causal LM paraphraser (guarded)")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test ratios per patient")
    p.add_argument("--executor", choices=("ray", "local"),
                   help="ray (Ray Data; embedded unless --address; the default) or local "
                   "(in-process); $REGIONCORPUS_EXECUTOR sets the default when --address is absent")
    p.add_argument("--address", help="Ray cluster to join, e.g. auto or ray://head:10001")
    p.add_argument("--model-actors", type=int, default=0,
                   help="model-stage actors (0, the default: one per GPU of this machine, or "
                   "with --address of the cluster, at --gpus-per-actor each; 1 on cpu)")
    p.add_argument("--gpus-per-actor", type=float, default=-1.0,
                   help="GPUs per model actor (-1: 1 when --device is cuda; 0.5: two actors "
                   "share a GPU, see docs/cluster.md)")
    p.add_argument("--max-retries", type=int, default=1,
                   help="Ray actor restarts and shard retries (never infinite)")
    p.add_argument("--workers", type=int, default=0, help="parallel series (0 = CPU count)")
    p.add_argument("--units-per-shard", type=int, default=8, help="series per shard")
    p.add_argument("--unit-timeout", type=float, default=600.0, help="seconds per series")
    p.add_argument("--unit-memory-mb", type=int, default=8192, help="memory cap per series")
    p.add_argument("--verbose", action="store_true",
                   help="let Ray's own log lines and warnings through (off by default)")
    p.add_argument("--json", action="store_true",
                   help="print the run summary as JSON on stdout (it is always written to "
                   "DIR/build_summary.json) instead of the short human summary")
    return p


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text}: expected comma-separated numbers") from None


def _per_table(values: list[str], n: int, flag: str, default: str) -> list[str]:
    """One value per table: none given → ``default``; one → for every table; else one each."""
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{flag}: give one value for all tables or one per table "
                         f"({n} tables, {len(values)} values)")
    return values


def _tables(args: argparse.Namespace) -> dict:
    """The annotation and report tables with their formats and keys (BuildConfig fields)."""
    n, m = len(args.annotations), len(args.reports)
    if n == 0 and args.annotations_format:
        raise ValueError("--annotations-format: needs --annotations TABLE")
    if m == 0 and (args.reports_key or args.reports_text):
        raise ValueError("--reports-key / --reports-text: need --reports TABLE")
    fmts = _per_table(args.annotations_format, n, "--annotations-format", "")
    if any(not f for f in fmts):
        raise ValueError("--annotations: needs --annotations-format (vindr, rsna, nih, siim, "
                         "coco or custom:SPEC)")
    keys = _per_table(args.reports_key, m, "--reports-key", "study:StudyInstanceUID")
    texts = _per_table(args.reports_text, m, "--reports-text", "report")
    reports = tuple((Path(p) if p != "beside" else Path("beside"), k, t)
                    for p, k, t in zip(args.reports, keys, texts, strict=True))
    return {"annotations": tuple(zip(args.annotations, fmts, strict=True)),
            "annotation_merge": args.annotation_merge, "reports": reports}


def _executor(args: argparse.Namespace) -> str:
    if args.executor:
        return args.executor
    # $REGIONCORPUS_EXECUTOR unset or empty: Ray
    return "ray" if args.address else os.environ.get("REGIONCORPUS_EXECUTOR") or "ray"


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    """Map parsed flags to the typed config (the only place that sees the namespace)."""
    slicing = SliceConfig(planes=tuple(args.planes.split(",")), every_k=args.every_k,
                          max_side=args.max_side, bits=args.bits,
                          ct_windows=tuple(args.ct_windows.split(",")))
    regions = RegionConfig(
        routes=tuple(args.roi.split(",")), min_area_mm2=args.min_area_mm2,
        segmenter=args.segmenter, detector=args.detector, det_conf=args.det_conf,
        det_iou=args.det_iou, min_mask_score=args.min_mask_score, device=args.device,
        encoder_batch=args.encoder_batch, box_labels=tuple(w for w in args.box_labels.split(",") if w))
    cfg = BuildConfig(
        sources=tuple(args.sources), out=args.out, key_file=args.key_file,
        collections=tuple((name, Path(path)) for name, path in args.collection),
        read=ReadConfig(min_slices=args.min_slices, allow_burned_in=args.allow_burned_in,
                        allow_unknown_label_names=args.keep_unknown_label_names,
                        refuse_gantry_tilt=args.refuse_gantry_tilt),
        slicing=slicing, regions=regions, caption_seed=args.caption_seed,
        captioner=args.captioner, split=SplitConfig(ratios=_floats(args.split, "--split")),
        **_tables(args),
        execution=ExecConfig(executor=_executor(args), address=args.address,
                             model_actors=args.model_actors, gpus_per_actor=args.gpus_per_actor,
                             max_retries=args.max_retries,
                             workers=args.workers, units_per_shard=args.units_per_shard,
                             unit_timeout_s=args.unit_timeout,
                             unit_memory_mb=args.unit_memory_mb),
    )
    if args.address:  # --device auto / --model-actors 0: check_cluster_gpus, once joined
        return cfg
    # without a model stage the device is unused: torch is not imported just to look
    return cfg.resolved(local_gpus() if cfg.regions.uses_models else 0)


@dataclass(frozen=True)
class BuildCommand:
    """A validated build-corpus run: the build and how it reports."""

    config: BuildConfig  # what to build, where
    verbose: bool = False  # let Ray's own log lines and warnings through
    json: bool = False  # the summary as JSON on stdout instead of the human lines

    def validate(self) -> None:
        self.config.validate()


def command_from_args(args: argparse.Namespace) -> BuildCommand:
    return BuildCommand(config_from_args(args), verbose=args.verbose, json=args.json)


SUMMARY_FILE = "build_summary.json"


def run_summary(manifest: dict) -> dict:
    """The run's summary (``DIR/build_summary.json``): counts, what was missing or redone,
    wall and worker time, throughput."""
    summary = {k: manifest.get(k) for k in ("found", "ingested", "quarantined", "skipped",
                                            "quarantined_by_reason", "rows", "complete",
                                            "missing_units", "changed_units",
                                            "out_of_memory_units", "rebuilt_shards",
                                            "timings_s", "worker_stage_s")}
    busy = sum(manifest["timings_s"].values()) or 1e-9
    summary["throughput_per_s"] = {t: round(n / busy, 1) for t, n in manifest["rows"].items()
                                   if t in ("images", "regions")}
    summary["shards"] = len(manifest.get("shards", {}))
    return summary


def human_summary(summary: dict, out: Path) -> str:
    """A few lines for a person: what was made, what was left out and why, where it is."""
    rows, wall = summary["rows"], sum(summary["timings_s"].values())
    lines = [f"build-corpus: {summary['found']} files found: {summary['ingested']} ingested, "
             f"{summary['quarantined']} quarantined, {summary['skipped']} skipped",
             f"  {rows.get('series', 0)} series -> {rows.get('images', 0)} images, "
             f"{rows.get('regions', 0)} regions in {summary['shards']} shards "
             f"({wall:.0f} s; {summary['throughput_per_s'].get('images', 0)} images/s)"]
    if summary["quarantined_by_reason"]:
        lines.append("  quarantined by reason: " + ", ".join(
            f"{k} {v}" for k, v in summary["quarantined_by_reason"].items()))
    for key, what in (("missing_units", "committed series not found"),
                      ("out_of_memory_units", "series killed for lack of memory")):
        if (summary.get(key) or {}).get("count"):
            lines.append(f"  {summary[key]['count']} {what} (see {SUMMARY_FILE})")
    if not summary["complete"]:
        lines.append("  INCOMPLETE: rerun the same command to resume")
    lines.append(f"  corpus: {out}  (manifest.json, {SUMMARY_FILE})")
    return "\n".join(lines)


def build_and_report(cmd: BuildCommand) -> int:
    """Build the corpus, write DIR/build_summary.json and print a short summary (or, with
    --json, the summary itself). A request the cluster cannot meet (found once it is joined,
    before any work) is a usage error."""
    cfg = cmd.config
    if cmd.verbose:
        os.environ[VERBOSE_ENV] = "1"
    elif cfg.execution.executor == "ray":
        quiet_ray()  # the driver's Ray log lines and warnings; before ray.init
    count_beside(("series", "shards"), CommitCounter(cfg.out))
    try:
        manifest = build(cfg)
    except RequestError as e:
        raise UsageError(str(e)) from None
    finally:
        count_beside(("series", "shards"), None)
    summary = run_summary(manifest)
    put_bytes(join(cfg.out, SUMMARY_FILE), (json.dumps(summary, indent=1) + "\n").encode())
    print(json.dumps(summary, indent=1) if cmd.json else human_summary(summary, cfg.out),
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), command_from_args, build_and_report, argv)


if __name__ == "__main__":
    sys.exit(main())
