"""pipeline.storage on local paths: what a location is, joins, the atomic write, and that a
local source root is used in place (remote behaviour: tests/pipeline/run/test_s3.py, against
a real S3 server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import storage
from pipeline.ingest.discover import local_roots

SEGMENT = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="-_."),
                  min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@given(st.sampled_from(["s3", "gs", "S3"]), SEGMENT, st.lists(SEGMENT, max_size=4))
def test_uris_stay_strings_and_join_with_slashes(scheme, bucket, parts):
    uri = f"{scheme}://{bucket}/" + "/".join(parts)
    loc = storage.location(uri + "/")
    assert isinstance(loc, str) and storage.is_remote(loc) and not loc.endswith("/")
    joined = storage.join(loc, "regions", "shard-00000.parquet")
    assert joined == f"{loc}/regions/shard-00000.parquet"
    assert storage.name(joined) == "shard-00000.parquet"


@given(st.lists(SEGMENT, min_size=1, max_size=4))
def test_local_paths_stay_paths(parts):
    loc = storage.location("/".join(parts))
    assert isinstance(loc, Path) and not storage.is_remote(loc)
    assert storage.join(loc, "a", "b") == Path(*parts, "a", "b")


@pytest.mark.parametrize("text", ["http://host/x", "ftp://host/x", "file2://x"])
def test_unknown_schemes_are_refused(text):
    with pytest.raises(ValueError, match="unsupported scheme"):
        storage.location(text)


def test_put_bytes_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "manifest.json"
    storage.put_bytes(target, b"old")
    storage.put_bytes(target, b"new contents")
    assert storage.read_bytes(target) == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert storage.is_file(target) and storage.is_dir(tmp_path) and not storage.exists(
        tmp_path / "nope")


def test_missing_lists_what_is_not_a_file(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "d").mkdir()
    locs = [tmp_path / "a", tmp_path / "b", tmp_path / "d"]
    assert storage.missing(locs) == [tmp_path / "b", tmp_path / "d"]
    assert storage.missing([]) == []


def test_delete_and_list_files(tmp_path):
    for rel in ("x/1.bin", "x/y/2.bin", "x/3.bin"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"z")
    assert [Path(i.path).name for i in storage.list_files(tmp_path / "x")] == ["1.bin", "3.bin"]
    assert len(storage.list_files(tmp_path / "x", recursive=True)) == 3
    storage.delete(tmp_path / "x" / "1.bin")
    storage.delete(tmp_path / "x" / "1.bin")  # gone already: nothing
    assert [Path(i.path).name for i in storage.list_files(tmp_path / "x")] == ["3.bin"]
    assert storage.list_files(tmp_path / "absent") == []


def test_local_roots_are_used_in_place(tmp_path):
    with local_roots([tmp_path, str(tmp_path / "b")]) as roots:
        assert roots == [tmp_path, tmp_path / "b"]


def test_orphaned_staging_folders_are_removed_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from pipeline.ingest.discover import STAGE_PREFIX, remove_orphaned_stages

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dead, live = tmp_path / f"{STAGE_PREFIX}{gone}-abc", tmp_path / f"{STAGE_PREFIX}{os.getpid()}-x"
    other = tmp_path / "unrelated-1-x"
    for d in (dead, live, other):
        (d / "bucket").mkdir(parents=True)
    assert remove_orphaned_stages(tmp_path) == 1
    assert not dead.exists() and live.exists() and other.exists()
