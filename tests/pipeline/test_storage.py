"""pipeline.storage on local paths: what a location is, joins, the atomic write; and the names
pipeline.ingest.remote gives objects (virtual paths, fetched copies). Remote behaviour:
tests/pipeline/run/test_s3.py, against a real S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline import storage
from pipeline.ingest import remote

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


CANARY = "DOE^JANE_19450101"
# object names as users write them: any text, slashes doubled, dot segments, a patient's name
NAME_PART = st.one_of(st.text(min_size=0, max_size=10), st.sampled_from(
    ["", ".", "..", CANARY, "IM-0001.dcm", "CT_seg.nii.gz", "x.NII", "names.json", "a b", "é^"]))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(["s3", "gs"]), st.lists(NAME_PART, min_size=1, max_size=6))
def test_an_object_either_round_trips_through_its_virtual_path_or_is_refused(scheme, parts):
    """Two objects never share a virtual path: a name with an empty, ``.`` or ``..`` segment
    (which a path would fold) is refused (a ``filesystem`` row), every other comes back."""
    uri = f"{scheme}://bucket-a/{'/'.join(parts)}"
    if "\x00" in uri:
        return
    path = remote.virtual_root(uri)
    assert path.is_relative_to(remote.REMOTE_BASE)
    if remote.holds_name(uri):
        assert remote.object_uri(path) == uri
    else:
        assert any(p in ("", ".", "..") for p in parts) or remote.object_uri(path) != uri
    assert remote.object_uri(Path("/data") / "/".join(p for p in parts if p)) is None


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(NAME_PART.filter(lambda p: p not in ("", ".", "..")), min_size=1, max_size=5))
def test_fetched_copies_are_named_by_number_and_format_only(parts):
    """A fetched copy's name is a number and a suffix from the fixed list (``.nii.gz`` tells
    nibabel the format): nothing of the object's name, a patient's name, reaches the disk."""
    import re

    uri = f"s3://bucket-a/{'/'.join(parts)}"
    assume(remote.holds_name(uri) and "\x00" not in uri)  # others are refused at the listing
    path = remote.virtual_root(uri)
    seen = []
    orig = remote.fetch
    remote.fetch = lambda u, dest, scratch, limit=None: seen.append((u, dest)) or False
    try:
        with remote.local_copies([path, Path("/local/file.dcm")]) as local:
            assert local[Path("/local/file.dcm")] == Path("/local/file.dcm")
            here = local[path]
    finally:
        remote.fetch = orig
    assert seen == [(uri, here)]
    assert re.fullmatch(r"\d{6}(\.nii\.gz|\.nii|\.json|\.dcm)?", here.name)
    assert here.name.endswith(remote._suffix(path)) and CANARY not in str(here)
    assert not here.parent.exists()  # removed on exit


def test_gz_named_objects_are_read_and_written_as_stored(tmp_path):
    """pyarrow guesses compression from a name by default: a ``.nii.gz`` object would come
    back decompressed (and a nibabel read of the copy fail). Bytes are moved as stored."""
    import gzip

    body = gzip.compress(b"label volume")
    storage.put_bytes(tmp_path / "CT_seg.nii.gz", body)
    assert (tmp_path / "CT_seg.nii.gz").read_bytes() == body
    assert storage.read_bytes(tmp_path / "CT_seg.nii.gz") == body
    dest = tmp_path / "copy.nii.gz"
    (tmp_path / "scratch").mkdir()
    assert remote.fetch(str(tmp_path / "CT_seg.nii.gz"), dest, tmp_path / "scratch")
    assert dest.read_bytes() == body


FETCHER = """
import sys, time
from pathlib import Path
from pipeline.ingest import remote
remote.fetch = lambda *a, **k: time.sleep(3600)  # a fetch that never ends
with remote.local_copies([remote.virtual_root("s3://bucket-a/" + sys.argv[1])]):
    pass
"""


def test_folders_of_killed_fetchers_are_removed_live_ones_kept(tmp_path):
    """kill -9 in the middle of a fetch leaves its folder; the next sweep on the node removes
    it, and keeps the folder of a fetcher that is still running (liveness by the folder's
    lock, not by process ids, which other pid namespaces on the node reuse)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", FETCHER, name], env=env)
             for name in ("killed.dcm", "running.dcm")]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob(f"{remote.FETCH_PREFIX}*/{remote.LOCK_NAME}"))) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        time.sleep(0.2)  # both hold their locks
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        other = tmp_path / "unrelated-1-x"
        other.mkdir()
        assert remote.remove_orphans(tmp_path) == 1
        left = list(tmp_path.glob(f"{remote.FETCH_PREFIX}*"))
        assert [d.name.split("-")[2] for d in left] == [str(procs[1].pid)] and other.exists()
    finally:
        for p in procs:
            p.kill()
            p.wait()
