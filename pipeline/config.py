"""Typed configuration of a build, made once from the command line (workflows/build_corpus.py).

Every field is commented; ``BuildConfig.validate`` checks the whole config before any work and
raises ``ValueError`` naming the flag and the bad value.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.images.slicing import SliceConfig
from pipeline.ingest.read import ReadConfig
from pipeline.roi.regions import RegionConfig
from pipeline.write import file_sha256

PIPELINE_VERSION = "0.1.0"




@dataclass(frozen=True)
class ExecConfig:
    """How the build runs."""

    executor: str = "ray"  # "ray": Ray Data (embedded, or --address); "local": in-process
    address: str | None = None  # Ray cluster to join ("auto", "ray://host:10001"); None = embedded
    workers: int = 0  # concurrent units (local) / CPUs of the embedded Ray; 0 = CPU count
    model_actors: int = 1  # model-stage actors (one per GPU on a cluster)
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

    def validate(self) -> None:
        if not self.sources and not self.collections:
            raise ValueError("SOURCE: give at least one source folder (or --collection)")
        if self.collections:
            from pipeline.ingest.collections import load_sources

            known = load_sources()
            for name, root in self.collections:
                if name not in known:
                    raise ValueError(f"--collection {name}: unknown layout; known: "
                                     f"{', '.join(sorted(known))}")
                if not Path(root).is_dir():
                    raise ValueError(f"--collection {name} {root}: no such folder")
        for s in self.sources:
            if not Path(s).exists():
                raise ValueError(f"SOURCE {s}: no such file or directory")
        r = self.split.ratios
        if len(r) != 3 or min(r) < 0 or abs(sum(r) - 1.0) > 1e-6:
            raise ValueError(f"--split {','.join(map(str, r))}: three non-negative ratios summing to 1")
        e = self.execution
        if e.workers < 0:
            raise ValueError(f"--workers {e.workers}: must be >= 0")
        if e.units_per_shard < 1:
            raise ValueError(f"--units-per-shard {e.units_per_shard}: must be >= 1")
        if e.unit_timeout_s <= 0:
            raise ValueError(f"--unit-timeout {e.unit_timeout_s}: must be > 0")
        if e.unit_memory_mb < 256:
            raise ValueError(f"--unit-memory-mb {e.unit_memory_mb}: must be >= 256")
        if self.regions.detector and not Path(self.regions.detector).is_file():
            raise ValueError(f"--detector {self.regions.detector}: no such file")
        if self.captioner and not (self.captioner.startswith("hf:")
                                   and Path(self.captioner[3:]).is_dir()):
            raise ValueError(f"--captioner {self.captioner}: expected hf:LOCAL_FOLDER "
                             "(a transformers causal LM saved on this machine)")
        if e.executor not in ("local", "ray"):
            raise ValueError(f"--executor {e.executor}: choose from ray, local")
        if e.address and e.executor != "ray":
            raise ValueError(f"--address {e.address}: needs --executor ray")
        if e.model_actors < 1:
            raise ValueError(f"--model-actors {e.model_actors}: must be >= 1")
        if e.max_retries < 0:
            raise ValueError(f"--max-retries {e.max_retries}: must be >= 0")

    def config_hash(self) -> str:
        """Hash of everything that changes outputs (not paths, not worker counts)."""
        d = asdict(self)
        for k in ("sources", "out", "key_file", "execution", "collections"):
            d.pop(k)
        d["units_per_shard"] = self.execution.units_per_shard
        d["regions"].pop("device")
        if self.regions.detector:  # the weights' content, not their path
            d["regions"]["detector"] = file_sha256(self.regions.detector)
        d["pipeline_version"] = PIPELINE_VERSION
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
