"""The corpus format (pipeline/write.py): exactly-once commits and rebuilds, no empty table
file, and the one committed-file list every reader uses (manifest, dataset card, read_table).

Lifecycles are generated: any sequence of first commits, rebuilds (new attempt of a committed
shard), stray files and half-finished attempts leaves the committed-file list equal to a
model of it, and nothing else is ever listed or read."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.write import (
    FILES_SCHEMA,
    commit_shard,
    committed_files,
    committed_shards,
    committed_tables,
    marker_units,
    read_table,
    shard_name,
    table_file,
    unit_digest,
    write_manifest,
)

TABLES = ("files", "regions")
KEYS = {"files": "file_key", "regions": "region_id"}


def _rows(table: str, tag: str, n: int) -> list[dict]:
    return [{KEYS[table]: f"{tag}-{i}", "unit_key": f"u-{tag}"} for i in range(n)]


def _manifest(out: Path) -> dict:
    """What build writes: the live markers, and the rows they hold."""
    live, _ = committed_shards(out)
    rows = {t: sum(m["tables"].get(t, {}).get("rows", 0) for m in live.values()) for t in TABLES}
    manifest = {"shards": live, "rows": rows}
    write_manifest(out, manifest)
    return manifest


def _card(out: Path) -> dict[str, list[str]]:
    """config name → data files of the dataset card's YAML header."""
    header = (out / "README.md").read_text().split("---")[1]
    configs = yaml.safe_load(header)["configs"]
    return {c["config_name"]: c["data_files"][0]["path"] for c in configs}


commits = st.tuples(st.just("commit"), st.integers(0, 3),
                    st.fixed_dictionaries({t: st.integers(0, 3) for t in TABLES}))
strays = st.tuples(st.just("stray"), st.integers(0, 3), st.sampled_from(TABLES))
halves = st.tuples(st.just("half"), st.integers(0, 3), st.sampled_from(TABLES))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(commits, strays, halves), min_size=1, max_size=12))
def test_any_lifecycle_lists_exactly_the_committed_files(ops):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        model: dict[str, dict] = {}  # shard → (attempt, rows per table)
        for op, k, arg in ops:
            name = shard_name(k)
            attempt = model[name][0] + 1 if name in model else 0
            if op == "commit":  # a first commit, or a rebuild replacing the committed attempt
                old = committed_shards(out)[0].get(name)
                supersedes = [i["file"] for i in old["tables"].values() if "file" in i] if old \
                    else []
                tables = {t: _rows(t, f"{name}.{attempt}", arg[t]) for t in TABLES}
                commit_shard(out, name, tables, units={f"u-{name}": "d"}, attempt=attempt,
                             supersedes=supersedes)
                model[name] = (attempt, arg)
            else:  # a stray file, or the files of an attempt killed before its marker
                path = (out / arg / f"shard-{k + 90:05d}.parquet" if op == "stray"
                        else table_file(out, arg, name, attempt))
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.Table.from_pylist(_rows(arg, "stray", 2)), path)
            manifest = _manifest(out)
            for t in TABLES:
                want = [table_file(out, t, s, a) for s, (a, n) in sorted(model.items()) if n[t]]
                assert committed_files(out, t) == want
                assert _card(out).get(t, []) == [str(p.relative_to(out)) for p in want]
                got = read_table(out, t, [KEYS[t]])
                assert len(got) == manifest["rows"][t] == sum(n[t] for _, n in model.values())
                assert not any(r[KEYS[t]].startswith("stray") for r in got)
            for s, (a, _) in model.items():  # older attempts of a committed shard are gone
                for t in TABLES:
                    assert not any(table_file(out, t, s, b).exists() for b in range(a))


def test_empty_table_has_no_file_and_the_marker_says_so(tmp_path):
    marker = commit_shard(tmp_path, "shard-00000", {"files": _rows("files", "a", 2),
                                                    "regions": []})
    assert marker["tables"]["regions"] == {"rows": 0}
    assert not (tmp_path / "regions").exists()
    assert pq.read_schema(tmp_path / marker["tables"]["files"]["file"]).equals(FILES_SCHEMA)
    assert list(committed_shards(tmp_path)[0]) == ["shard-00000"]  # committed, no file missing
    _manifest(tmp_path)
    assert committed_files(tmp_path, "regions") == [] and read_table(tmp_path, "regions") == []
    assert set(_card(tmp_path)) == {"files"}  # datasets would refuse a config with no file


def test_a_shard_some_compact_shard_replaces_is_never_listed(tmp_path):
    """Compaction's manifest lists the compact shard; should it still list a replaced one (an
    older manifest merged by hand, a tool that forgot), its files are not read twice."""
    a = commit_shard(tmp_path, "shard-00000", {"regions": _rows("regions", "a", 2)})
    b = commit_shard(tmp_path, "compact-00000", {"regions": _rows("regions", "a", 2)})
    b["replaces"] = ["shard-00000"]
    manifest = {"shards": {"shard-00000": a, "compact-00000": b}}
    assert list(committed_tables(tmp_path, manifest)) == ["compact-00000"]
    assert committed_files(tmp_path, "regions", manifest) == [tmp_path / b["tables"]["regions"]
                                                               ["file"]]


def test_readers_need_a_manifest(tmp_path):
    commit_shard(tmp_path, "shard-00000", {"regions": _rows("regions", "a", 2)})
    with pytest.raises(ValueError, match="no manifest.json") as e:  # markers alone: not yet
        read_table(tmp_path, "regions")
    assert len(str(e.value).splitlines()) == 1


def test_units_of_a_marker_written_before_markers_listed_them(tmp_path):
    rows = [{"file_key": f"f{i}", "unit_key": f"u{i % 2}"} for i in range(5)]
    rows.append({"file_key": "loose", "unit_key": None})
    marker = commit_shard(tmp_path, "shard-00000", {"files": rows},
                          units={"u0": unit_digest(["f0", "f2", "f4"]),
                                 "u1": unit_digest(["f3", "f1"])})
    legacy = {k: v for k, v in marker.items() if k != "units"}
    assert marker_units(tmp_path, legacy) == marker["units"] == marker_units(tmp_path, marker)
    on_disk = json.loads((tmp_path / "_commits" / "shard-00000.json").read_text())
    assert on_disk["units"] == marker["units"] and on_disk["attempt"] == 0
