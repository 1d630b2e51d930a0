"""Shared helpers for tests/catalogs (a plain module, not a conftest: tests/pipeline imports the
top-level ``conftest`` by name, and a second conftest.py would shadow it).

``corpus_once`` builds one real phantom corpus per test session (make_phantoms + build-corpus,
96×96 slices, three committed shards; with the tests' key its patients fall in train, val
and test) and hands out its path; tests that change a corpus work on a copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_BUILT: dict[str, Path] = {}


def corpus_once(tmp_path_factory) -> Path:
    if "corpus" not in _BUILT:
        from pipeline.phantoms.studies import make_phantoms
        from workflows.build_corpus import main

        root = tmp_path_factory.mktemp("catalog_corpus")
        make_phantoms(root / "phantoms", patients=6, seed=0, matrix=96)
        out = root / "corpus"
        assert main([str(root / "phantoms"), "--out", str(out), "--units-per-shard", "2",
                     "--workers", "2"]) == 0
        _BUILT["corpus"] = out
    return _BUILT["corpus"]


def copy_corpus(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def add_shard(root: Path, name: str, tables: dict[str, list[dict]],
              manifest_out: Path | None = None) -> Path:
    """Write ``tables`` as ``root/<table>/<name>.parquet`` (schema of the table's existing
    files) and register them as shard ``name`` in a copy of the manifest (``manifest_out``,
    default ``root/manifest-<name>.json``); returns that manifest's path."""
    manifest = json.loads((root / "manifest.json").read_text())
    entry = {"shard": name, "tables": {}}
    for table, rows in tables.items():
        schema = pq.read_schema(next((root / table).glob("shard-*.parquet")))
        path = root / table / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")
        entry["tables"][table] = {"file": f"{table}/{path.name}", "rows": len(rows),
                                  "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        manifest["rows"][table] = manifest["rows"].get(table, 0) + len(rows)
    manifest["shards"][name] = entry
    out = manifest_out or root / f"manifest-{name}.json"
    out.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return out


def first_rows(root: Path, table: str, n: int = 1, where=None) -> list[dict]:
    """First ``n`` rows (pyarrow, committed shard files in name order) matching ``where``."""
    manifest = json.loads((root / "manifest.json").read_text())
    out = []
    for name in sorted(manifest["shards"]):
        info = manifest["shards"][name]["tables"].get(table)
        if not info:
            continue
        for row in pq.read_table(root / info["file"]).to_pylist():
            if where is None or where(row):
                out.append(row)
                if len(out) == n:
                    return out
    return out
