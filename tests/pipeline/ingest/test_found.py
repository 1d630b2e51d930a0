"""Discovery as one table (pipeline.ingest.found): the driver holds no Python object per file
once a collection is walked, scanned and planned; the table gives back every entry exactly
(names that are not UTF-8 included); planning on it equals planning on the entries."""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from factories import ramp_volume, write_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import BuildConfig, ExecConfig
from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.discover import scan_headers, walk
from pipeline.ingest.found import Found, cell, uncell
from pipeline.ingest.units import group_units, plan_units, unit_tasks
from pipeline.run.scan import scan

DEID = Deidentifier(b"f" * 32)


def _many_files(src: Path, series: int, slices: int) -> int:
    for s in range(series):
        write_series(src / f"s{s:03d}", ramp_volume((slices, 8, 8), seed=s),
                     series_uid=f"1.2.3.{s + 1}")
    for i in range(series * 2):  # files settled by the walk, outside every unit
        (src / "notes" / f"n{i:04d}.txt").parent.mkdir(exist_ok=True)
        (src / "notes" / f"n{i:04d}.txt").write_text("x")
    return series * slices + series * 2


def test_planned_collection_holds_no_python_object_per_file(tmp_path):
    """Walk, header scan and planning of 2 440 files: what stays on the Python heap (the table
    lives in Arrow memory) is per unit, not per file. One FileEntry + Header per file, as
    discovery held before, is ~3 KB per file."""
    n = _many_files(tmp_path / "src", series=20, slices=120)
    cfg = BuildConfig(sources=(tmp_path / "src",), out=tmp_path / "out",
                      execution=ExecConfig(executor="local", workers=1, header_batch=256))
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        found = Found.walk(cfg.sources, DEID)
        scan(found, cfg, DEID)
        units = plan_units(found, DEID)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(found) == n and len(units) == 20
    assert sum(len(u.images) for u in units) == 20 * 120
    per_file = (held - base) / n
    assert per_file < 150, f"{per_file:.0f} bytes of Python objects per file"


def _equal_entries(a, b):
    for x, y in zip(a, b, strict=True):
        assert (x.index, x.path, x.rel, x.file_key, x.size, x.kind, x.status, x.reason,
                x.error, x.header, x.mtime_ns, x.group_key) == \
               (y.index, y.path, y.rel, y.file_key, y.size, y.kind, y.status, y.reason,
                y.error, y.header, y.mtime_ns, y.group_key)


def test_the_table_gives_back_every_entry_exactly(tmp_path):
    """Walked into a table (paths from the root's base and ``rel``) or kept as a list, with
    headers: the same entries, names that are not UTF-8 and a second root included."""
    src, other = tmp_path / "a" / "data", tmp_path / "b" / "data"
    write_series(src / "ct", ramp_volume((3, 16, 16)), series_uid="1.2.3")
    write_series(other / "x", ramp_volume((2, 8, 8)), series_uid="1.2.4")
    bad = os.fsencode(src / "ct") + b"/IM_\xff\xfe.dcm"
    with open(bad, "wb") as f:
        f.write((src / "ct" / "IM0000.dcm").read_bytes())
    (src / "readme.txt").write_text("x")
    listed = scan_headers(walk([src, other], DEID), DEID)
    found = Found.walk([src, other], DEID, chunk=2)  # chunks of 2 rows: several frames
    done = {e.index: e for e in scan_headers(found.entries(range(len(found))), DEID)}
    assert sum(e.header is not None for e in done.values()) == 6
    from pipeline.ingest.found import entry_rows

    found.update(entry_rows(done.values()).drop("rel", "root", "file_key", "size", "kind",
                                                "mtime_ns"))
    _equal_entries(found.entries(range(len(found))), listed)
    _equal_entries(Found.from_entries(listed).entries(range(len(listed))), listed)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=8) | st.sampled_from(["\udcff", "\udc80", "\ud800", "/",
                                                       "\x00", "PATIENT^NAME"]),
                max_size=6))
def test_cells_round_trip_every_name(pieces):
    """Any name Python may hold (lone surrogates from undecodable bytes, the marker itself)
    is a valid UTF-8 cell that reads back as itself."""
    text = "".join(pieces)
    c = cell(text)
    c.encode("utf-8")
    assert uncell(c) == text


def test_planning_on_the_table_equals_planning_on_entries(tmp_path):
    """plan_units on a walked table and group_units on the list of the same entries: the same
    units with the same files, labels and headers."""
    src = tmp_path / "src"
    write_series(src / "ct", ramp_volume((3, 16, 16)), series_uid="1.2.3")
    write_series(src / "mr", ramp_volume((2, 8, 8)), series_uid="1.2.4")
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.eye(4))
    nib.save(img, src / "vol.nii.gz")
    nib.save(img, src / "vol_seg.nii.gz")
    nib.save(img, src / "ct_seg.nii.gz")  # a label map of the DICOM series in ct/
    nib.save(img, src / "lost_seg.nii.gz")  # pairs with nothing
    (src / "ct_seg.json").write_text('{"1": "liver"}')
    (src / "other.json").write_text("{}")
    cfg = BuildConfig(sources=(src,), out=tmp_path / "out",
                      execution=ExecConfig(executor="local", workers=1))
    found = Found.walk(cfg.sources, DEID)
    scan(found, cfg, DEID)
    planned = unit_tasks(plan_units(found, DEID), found)
    entries = scan_headers(walk([src], DEID), DEID)
    grouped = group_units(entries, DEID)
    assert [(t.unit_key, t.kind, t.image_files, t.label_file, t.label_kind, t.names_file,
             t.headers) for t in planned] == \
           [(t.unit_key, t.kind, t.image_files, t.label_file, t.label_kind, t.names_file,
             t.headers) for t in grouped]
    assert len(planned) == 3 and sum(t.label_file is not None for t in planned) == 2
    outcomes = dict(zip(found.frame["rel"], found.frame["reason"], strict=True))
    assert outcomes == {e.rel: e.reason for e in entries}
    assert outcomes["src/lost_seg.nii.gz"] == "unpaired_label"
    assert outcomes["src/other.json"] == "sidecar"


@pytest.mark.parametrize("workers", [1, 2])
def test_isolator_takes_items_as_children_free_up(workers):
    """Isolator.map does not run a generator ahead: it holds at most ``workers`` items more
    than it has answered (a build's shards are made as they are dispatched)."""
    from pipeline.run.isolate import Isolator

    taken, answered, ahead = [0], [0], []

    def items():
        for i in range(12):
            taken[0] += 1
            ahead.append(taken[0] - answered[0])
            yield i

    with Isolator(abs, workers, 30.0, 1 << 30) as iso:
        for _ in iso.map(items()):
            answered[0] += 1
    assert answered[0] == 12 and max(ahead) <= workers


def test_build_corpus_sets_the_allocators_before_polars_and_arrow_load(tmp_path):
    """The head's allocators return freed memory at once (workflows/build_corpus.py): the
    variables are set before Polars or Arrow is first imported (later they do nothing), and a
    value the user set is kept."""
    import ast
    import subprocess
    import sys

    probe = (
        "import builtins, os, sys\n"
        "seen = {}\n"
        "real = builtins.__import__\n"
        "def hook(name, *a, **k):\n"
        "    top = name.split('.')[0]\n"
        "    if top in ('polars', 'pyarrow') and top not in seen:\n"
        "        seen[top] = (os.environ.get('_RJEM_MALLOC_CONF'),\n"
        "                     os.environ.get('ARROW_DEFAULT_MEMORY_POOL'))\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = hook\n"
        "import workflows.build_corpus\n"
        "print(seen)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("_RJEM_MALLOC_CONF", "ARROW_DEFAULT_MEMORY_POOL")}
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=root, check=True,
                         capture_output=True, text=True).stdout
    seen = ast.literal_eval(out)
    assert set(seen) == {"polars", "pyarrow"}
    assert all(v == ("dirty_decay_ms:0,muzzy_decay_ms:0", "system") for v in seen.values())
    env["ARROW_DEFAULT_MEMORY_POOL"] = "jemalloc"
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=root, check=True,
                         capture_output=True, text=True).stdout
    assert all(v[1] == "jemalloc" for v in ast.literal_eval(out).values())


def _local_parts(deid):
    from pipeline.ingest.found import walk_part

    return lambda parts: [walk_part(root, label, number, tops, deid, max_bytes)
                          for root, label, number, tops, max_bytes in parts]


def _same_walk(roots, map_parts, max_bytes=None):
    whole = Found.walk(roots, DEID, max_bytes)
    parted = Found.walk(roots, DEID, max_bytes, map_parts=map_parts)
    assert parted.frame.equals(whole.frame)
    assert (parted.bases, parted.labels) == (whole.bases, whole.labels)
    return whole


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(st.sampled_from(["a", "b", "Zed", "PATIENT^X", "x y"]),
                                   min_size=0, max_size=3),
                          st.sampled_from(["IM1.dcm", "v.nii.gz", "n.txt", "l_seg.nii.gz"])),
                max_size=25),
       st.integers(1, 4))
def test_a_walk_in_partitions_gives_the_same_rows(tmp_path_factory, layout, per_part):
    """Walked in partitions (a root's own listing, then its subfolders a few at a time, as the
    build's Ray tasks walk them) or in one pass: the same rows in the same order, for any
    layout (files beside folders, nested folders, two roots)."""
    import pipeline.ingest.found as found_mod

    base = tmp_path_factory.mktemp("walk")
    for i, (folders, name) in enumerate(layout):
        root = base / ("one" if i % 3 else "two") / "data"
        path = root.joinpath(*folders, f"{i}_{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * i)
    roots = [base / r / "data" for r in ("one", "two")]
    for r in roots:
        r.mkdir(parents=True, exist_ok=True)
    sizes = []
    local = _local_parts(DEID)

    def parts(p):
        sizes.extend(len(tops) for _, _, _, tops, _ in p)
        return local(p)

    old = found_mod.PART_FOLDERS
    found_mod.PART_FOLDERS = per_part
    try:
        _same_walk(roots, parts)
    finally:
        found_mod.PART_FOLDERS = old
    assert all(1 <= n <= per_part for n in sizes)


def test_hostile_trees_walk_the_same_in_partitions(tmp_path):
    """Links in and out of the root, a loop, a folder no one may list, names that are not
    UTF-8, a file root beside a folder root: the same rows walked in partitions."""
    src = tmp_path / "src"
    write_series(src / "ct", ramp_volume((2, 8, 8)), series_uid="1.2.3")
    (src / "deep" / "er").mkdir(parents=True)
    (src / "deep" / "er" / "f.txt").write_text("x")
    (src / "top.txt").write_text("x")
    os.symlink(src / "ct", src / "link_dir")
    os.symlink(tmp_path, src / "deep" / "out_link")
    os.symlink(src / "loop", src / "loop")
    with open(os.fsencode(src) + b"/\xff\xfe_dir.txt", "wb") as f:
        f.write(b"x")
    locked = src / "zz_locked"
    locked.mkdir()
    (locked / "secret.dcm").write_bytes(b"x")
    locked.chmod(0)
    one = tmp_path / "one.dcm"
    one.write_bytes((src / "ct" / "IM0000.dcm").read_bytes())
    try:
        whole = _same_walk([src, one], _local_parts(DEID), max_bytes=1 << 20)
    finally:
        locked.chmod(0o755)
    assert len(whole) >= 9


def test_a_ray_build_walks_in_tasks_and_equals_a_local_build(tmp_path, monkeypatch):
    """build-corpus --executor ray walks a root's subfolders as Ray tasks, and its discovery
    equals the local executor's."""
    import pipeline.run.build as build_mod
    from pipeline.run.scan import stop_ray

    src = tmp_path / "src"
    for s in range(3):
        write_series(src / f"p{s}" / "ct", ramp_volume((2, 8, 8), seed=s),
                     series_uid=f"1.2.{s + 1}")
    (src / "top.txt").write_text("x")
    calls = []
    real = build_mod.ray_walk

    def counted(cfg, deid):
        run = real(cfg, deid)

        def parts(p):
            calls.append([len(tops) for _, _, _, tops, _ in p])
            return run(p)
        return parts

    monkeypatch.setattr(build_mod, "ray_walk", counted)
    try:
        found, _ = build_mod.discover(BuildConfig(
            sources=(src,), out=tmp_path / "r", execution=ExecConfig(executor="ray", workers=2)),
            DEID)
    finally:
        stop_ray()
    local, _ = build_mod.discover(BuildConfig(sources=(src,), out=tmp_path / "l",
                                              execution=ExecConfig(executor="local")), DEID)
    assert calls == [[3]] and found.frame.equals(local.frame) and len(found) == 7
