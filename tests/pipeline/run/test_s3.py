"""build-corpus against a real S3 server: sources read from and the corpus written to
``s3://`` through ``pipeline.storage``, the same client code a user's S3 goes through.

The server is moto's standalone S3 server, started by this module on 127.0.0.1 on a free
port; ``AWS_ENDPOINT_URL`` points the client at it (the standard variable a user sets for
MinIO, Ceph and others). A build from ``s3://bucket/src`` into ``s3://bucket/out`` equals the
same build on local disk row for row; a build killed with SIGKILL after its first commit and
rerun commits every row exactly once; Polars (catalogs), DuckDB and pyarrow read the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.ingest import remote
from pipeline.write import committed_files, committed_tables, read_manifest, read_table
from workflows.build_corpus import main

REPO = Path(__file__).resolve().parents[3]
ARGS = ["--executor", "local", "--workers", "2", "--units-per-shard", "1"]
TABLES = {"files": "file_key", "series": "series_key", "images": "image_id",
          "regions": "region_id"}
BUCKET = "corpus-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS variables point at it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and proc.poll() is None, "no S3 server"
                    time.sleep(0.1)
            pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                              allow_bucket_creation=True).create_dir(BUCKET)
            yield f"s3://{BUCKET}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory, s3) -> Path:
    """Three phantom patients in a local folder ``src`` and under ``s3://BUCKET/src``."""
    from pipeline.phantoms.studies import make_phantoms

    src = tmp_path_factory.mktemp("s3local") / "src"
    make_phantoms(src, patients=3, seed=5, matrix=32)
    fs, prefix = storage.resolve(f"{s3}/src")
    pafs.copy_files(str(src), prefix, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return src


@pytest.fixture(scope="module")
def local_corpus(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s3local") / "corpus"
    assert main([str(phantoms), "--out", str(out), *ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def s3_corpus(s3, phantoms) -> str:
    """The same build from ``s3://BUCKET/src`` into ``s3://BUCKET/out``."""
    out = f"{s3}/out"
    assert main([f"{s3}/src", "--out", out, *ARGS]) == 0
    return out


def _row_hashes(corpus) -> dict[str, dict[str, str]]:
    """Per table: key → sha256 of the whole row (PNG bytes included)."""
    out = {}
    for table, key in TABLES.items():
        rows = read_table(corpus, table)
        out[table] = {r[key]: hashlib.sha256(json.dumps(
            r, sort_keys=True, default=lambda b: b.hex()).encode()).hexdigest() for r in rows}
        assert len(out[table]) == len(rows), f"duplicate {key}"
    return out


def _objects(loc) -> set[str]:
    return {i.path for i in storage.list_files(loc, recursive=True)}


def _check_exactly_once(out: str) -> None:
    """One row per key, the manifest's counts are the committed rows, and every table object
    under the prefix is a committed one (no stray attempt, no temporary object)."""
    manifest = read_manifest(out)
    hashes = _row_hashes(out)
    for table in TABLES:
        assert len(hashes[table]) == manifest["rows"][table], table
    listed = {storage.resolve(f)[1] for t in TABLES for f in committed_files(out, t)}
    on_store = {p for t in TABLES for p in _objects(f"{out}/{t}")}
    assert on_store == listed
    assert manifest["complete"]


def test_s3_build_equals_local_build(s3, s3_corpus, local_corpus):
    out = s3_corpus
    want = _row_hashes(local_corpus)
    assert want["regions"], "the phantoms gave no regions: nothing compared"
    assert _row_hashes(out) == want  # same region ids, same rows, every table
    _check_exactly_once(out)
    assert not Path(out).exists()  # nothing went to a local folder named like the URI


def _commits(out: str) -> int:
    return sum(i.base_name.startswith("shard-")
               for i in storage.list_files(f"{out}/_commits"))


def test_kill9_after_first_commit_then_rerun_is_exactly_once(s3, phantoms, local_corpus):
    out = f"{s3}/killed"
    cmd = [sys.executable, "-m", "workflows.build_corpus", f"{s3}/src", "--out", out, *ARGS]
    # one worker: the shards commit one after another, so the kill lands between two
    proc = subprocess.Popen([*cmd, "--workers", "1"], cwd=REPO, env={**os.environ},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _commits(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = _commits(out)
    assert 1 <= n < 3, f"killed after {n} of 3 commits: nothing to resume"
    before = {p: storage.read_bytes(f"s3://{p}") for p in _objects(f"{out}/_commits")}

    assert main([f"{s3}/src", "--out", out, *ARGS]) == 0  # the rerun resumes
    _check_exactly_once(out)
    after = {p: storage.read_bytes(f"s3://{p}") for p in _objects(f"{out}/_commits")}
    assert {p: after[p] for p in before} == before  # committed shards kept, not redone
    assert _row_hashes(out) == _row_hashes(local_corpus)
    assert not _fetch_folders(dead_only=True)  # whatever the killed run's workers left


def _fetch_folders(dead_only: bool = False) -> list[Path]:
    found = Path(tempfile.gettempdir()).glob(f"{remote.FETCH_PREFIX}*-*")
    return [d for d in found if not dead_only or not remote._held(d)]


def test_workers_fetch_the_objects_the_driver_only_lists(s3, phantoms, tmp_path, monkeypatch):
    """No source is staged: the driver lists the bucket and fetches nothing; the forked
    workers fetch each object they read (a DICOM at most twice: its header, its unit) and
    remove their copies when the batch or unit is done."""
    log = tmp_path / "fetches"
    fetch = remote.fetch

    def logged(uri, dest, scratch, limit=None):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {uri}\n")
        return fetch(uri, dest, scratch, limit)

    monkeypatch.setattr(remote, "fetch", logged)  # the forked workers inherit it
    out = f"{s3}/fetched"
    assert main([f"{s3}/src", "--out", out, *ARGS]) == 0
    pids, uris = zip(*(line.split(" ", 1) for line in log.read_text().splitlines()),
                     strict=True)
    assert str(os.getpid()) not in pids, "the driver fetched a source object"
    objects = {f"s3://{p}" for p in _objects(f"{s3}/src")}
    counts = {u: uris.count(u) for u in set(uris)}
    assert set(counts) <= objects and max(counts.values()) <= 2
    dicoms = {u for u in objects if u.endswith(".dcm")}
    assert dicoms and all(counts.get(u) == 2 for u in dicoms)  # header scan + its unit
    assert not [d for d in _fetch_folders() if d.name.split("-")[2] in pids]


def test_ray_build_from_s3_equals_the_local_build(s3, phantoms, local_corpus):
    """``--executor ray``: the header-scan tasks and the unit actors fetch the objects (Ray's
    workers inherit the AWS variables of the driver that started them); same rows."""
    out = f"{s3}/ray"
    assert main([f"{s3}/src", "--out", out, "--executor", "ray", "--workers", "2",
                 "--units-per-shard", "1"]) == 0
    assert _row_hashes(out) == _row_hashes(local_corpus)
    _check_exactly_once(out)


def test_reports_beside_their_study_are_found_and_read_by_the_worker(s3, phantoms, tmp_path,
                                                                    monkeypatch):
    """``--reports beside`` on an S3 source: the ``<series>.txt`` is found among the listed
    objects (there is no local file to test for) and read by the unit's worker, not the driver;
    its text reaches the images' report captions."""
    series = next(d for d in sorted(next(phantoms.iterdir()).iterdir()) if d.is_dir())
    src = tmp_path / "withreport" / series.parent.name
    shutil.copytree(series, src / series.name)
    (src / f"{series.name}.txt").write_text("FINDINGS: The liver is enlarged.\n"
                                             "IMPRESSION: Hepatomegaly.")
    fs, prefix = storage.resolve(f"{s3}/withreport")
    pafs.copy_files(str(tmp_path / "withreport"), prefix,
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    pids = tmp_path / "pids"
    fetch = remote.fetch

    def logged(uri, dest, scratch, limit=None):
        if uri.endswith(".txt"):
            with open(pids, "a") as f:
                f.write(f"{os.getpid()}\n")
        return fetch(uri, dest, scratch, limit)

    monkeypatch.setattr(remote, "fetch", logged)
    out = f"{s3}/withreport-out"
    assert main([f"{s3}/withreport", "--out", out, "--reports", "beside", *ARGS]) == 0
    assert read_manifest(out)["reports"]["reports_attached"] == 1
    sources = {r["caption_report_source"] for r in read_table(out, "images")}
    assert sources == {"report"}
    assert any("enlarged" in (r["caption_report"] or "") for r in read_table(out, "images"))
    readers = pids.read_text().split()
    assert readers and str(os.getpid()) not in readers


def test_resume_rescans_only_rewritten_objects(s3, phantoms):
    """The file index of an S3 build: a rerun with nothing changed reads no header (each
    entry's size and LastModified come from the listing); an object written again (a new
    LastModified, the same bytes) is read again, alone."""
    out = f"{s3}/resume"
    assert main([f"{s3}/src", "--out", out, *ARGS]) == 0
    first = read_manifest(out)["header_scan"]
    assert first["scanned"] > 0 and first["from_index"] == 0
    assert main([f"{s3}/src", "--out", out, *ARGS]) == 0
    assert read_manifest(out)["header_scan"] == {**first, "scanned": 0,
                                                 "from_index": first["scanned"]}
    one = next(p for p in sorted(_objects(f"{s3}/src")) if p.endswith(".dcm"))
    time.sleep(1.1)  # LastModified has whole seconds on some servers
    storage.put_bytes(f"s3://{one}", storage.read_bytes(f"s3://{one}"))
    assert main([f"{s3}/src", "--out", out, *ARGS]) == 0
    assert read_manifest(out)["header_scan"]["scanned"] == 1
    _check_exactly_once(out)


def test_header_scan_of_objects_equals_the_local_scan(s3, tmp_path, monkeypatch):
    """Every DICOM file pydicom ships (deflated, encapsulated, big-endian, truncated, no pixel
    data, RTSTRUCT, ...) scanned from its object gives the header and verdict of the local
    scan, with the ranged first read made 2 KiB so that most objects take the prefix path and
    many the whole-object fallback; the prefix is trusted only for objects whose pixel data
    element it reached."""
    import shutil

    from pydicom.data import get_testdata_files

    from pipeline.ingest import discover
    from pipeline.ingest.deid import Deidentifier

    src = tmp_path / "pydicom"
    src.mkdir()
    for f in get_testdata_files("*.dcm"):
        shutil.copy(f, src / Path(f).name)
    fs, prefix = storage.resolve(f"{s3}/pydicom")
    pafs.copy_files(str(src), prefix, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    monkeypatch.setattr(discover, "HEAD_BYTES", 2048)
    limits = []
    fetch = remote.fetch
    monkeypatch.setattr(remote, "fetch", lambda u, d, s, limit=None: limits.append(limit)
                        or fetch(u, d, s, limit))
    deid = Deidentifier(b"k" * 32)
    scans = [discover.scan_headers(discover.walk([root], deid), deid)
             for root in (src, f"{s3}/pydicom")]
    local, objects = ({e.rel: (e.status, e.reason, e.header) for e in s} for s in scans)
    assert len(local) > 50 and objects == local
    whole = limits.count(None)
    assert 0 < whole < limits.count(2048) == len(local)  # some kept their prefix, some not


def test_objects_larger_than_the_budget_are_never_fetched(s3, phantoms, monkeypatch):
    """The listing's size decides: an object past ``max_bytes`` is a ``size_budget`` row and no
    worker downloads it (a 50 GB object would otherwise fill a node's disk, and every other
    unit's fetch there would fail with it)."""
    from pipeline.ingest import discover
    from pipeline.ingest.deid import Deidentifier

    dcm = sorted(p for p in _objects(f"{s3}/src") if p.endswith(".dcm"))[:2]
    small = storage.read_bytes(f"s3://{dcm[0]}")
    storage.put_bytes(f"{s3}/sized/small.dcm", small)
    storage.put_bytes(f"{s3}/sized/big.dcm", small + bytes(len(small)))
    fetched = []
    fetch = remote.fetch
    monkeypatch.setattr(remote, "fetch", lambda u, d, s, limit=None: fetched.append(u)
                        or fetch(u, d, s, limit))
    deid = Deidentifier(b"k" * 32)
    entries = discover.scan_headers(discover.walk([f"{s3}/sized"], deid,
                                                  max_bytes=len(small)), deid)
    by_name = {e.rel: e for e in entries}
    assert (by_name["sized/big.dcm"].status, by_name["sized/big.dcm"].reason) == (
        "quarantined", "size_budget")
    assert by_name["sized/small.dcm"].header is not None
    assert fetched == [f"{s3}/sized/small.dcm"]


def test_object_names_no_path_can_hold_are_rows_not_crashes(s3, phantoms):
    """Keys with an empty or dot segment (``a//b``, ``./x``) would fold onto another object's
    path: each is one ``filesystem`` row; the listing's other objects are walked as usual."""
    from pipeline.ingest.deid import Deidentifier
    from pipeline.ingest.discover import walk

    dcm = next(p for p in sorted(_objects(f"{s3}/src")) if p.endswith(".dcm"))
    body = storage.read_bytes(f"s3://{dcm}")
    import boto3  # pyarrow refuses to write such keys; other tools (and users) do not

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for name in ("ok/IM1.dcm", "ok//IM1.dcm", "x/./IM2.dcm", "y/../IM3.dcm"):
        client.put_object(Bucket=BUCKET, Key=f"odd/{name}", Body=body)
    listed = storage.list_files(f"{s3}/odd", recursive=True)
    entries = walk([f"{s3}/odd"], Deidentifier(b"k" * 32))
    assert len(entries) == len(listed) >= 2
    assert len({e.file_key for e in entries}) == len(entries)
    assert len({e.path for e in entries if not e.status}) == sum(not e.status for e in entries)
    by_name = {e.rel: (e.status, e.reason) for e in entries}
    assert by_name["odd/ok/IM1.dcm"] == (None, None)
    assert all(v == ("quarantined", "filesystem") for k, v in by_name.items()
               if k != "odd/ok/IM1.dcm")


def test_catalogs_duckdb_and_pyarrow_read_the_s3_corpus(s3_corpus):
    import polars as pl

    from catalogs.corpus import Corpus, duckdb_register

    out = s3_corpus
    manifest = read_manifest(out)
    n = manifest["rows"]["regions"]

    corpus = Corpus.open(out)
    assert corpus.table("regions").select(pl.len()).collect().item() == n
    assert corpus.summary()["manifest_rows"]["regions"] == n

    some = corpus.table("regions").select("region_id").head(1).collect().item()
    region = corpus.region(some)  # the region API: its row, then its image's PNG, from S3
    assert region.mask.any() and region.image.size

    con = duckdb_register(corpus)
    assert con.execute("SELECT count(*) FROM regions").fetchone()[0] == n
    assert con.execute("SELECT count(DISTINCT image_id) FROM images").fetchone()[0] \
        == manifest["rows"]["images"]

    from catalogs import jobs

    assert len(jobs.read_table(corpus, "regions", ["region_id"]).compute()) == n  # dask

    # what the trainer's reader gets: locations pq.ParquetFile opens as they are
    shards = committed_tables(out)
    assert all(isinstance(f, str) and f.startswith("s3://")
               for files in shards.values() for f in files.values())
    rows = sum(pq.ParquetFile(files["regions"]).metadata.num_rows
               for files in shards.values() if "regions" in files)
    assert rows == n


MICRO = {"image": {"image_size": 64, "patch_size": 16, "width": 32, "depth": 1, "heads": 2},
         "text": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64, "max_len": 32,
                  "vocab_size": 300},
         "roi": {"roi_size": 32, "layers": 1}, "model": {"embed_dim": 16},
         "data": {"batch": 4, "workers": 0, "shuffle_buffer": 8},
         "train": {"stage_steps": [1, 1, 1], "warmup_steps": 1, "log_every": 1}}


def test_trainer_reads_and_trains_on_the_s3_corpus(s3_corpus, local_corpus, tmp_path):
    """The trainer's index of the S3 corpus equals the local one's, and train-model runs on
    the s3:// corpus through all three stages."""
    import json

    from model.data import CorpusIndex
    from workflows import train_model

    remote, local = CorpusIndex.open(s3_corpus), CorpusIndex.open(local_corpus)
    assert remote.labels == local.labels and remote.sides == local.sides
    assert remote.split_images("train") == local.split_images("train") > 0
    preset = tmp_path / "micro.json"
    preset.write_text(json.dumps(MICRO))
    assert train_model.main(["--corpus", s3_corpus, "--out", str(tmp_path / "run"),
                             "--preset", str(preset), "--steps", "3"]) == 0
    assert (tmp_path / "run" / "ckpt" / "last.pt").is_file()


def test_redone_shard_on_s3_commits_by_marker_then_deletes_the_old_attempt(s3):
    from pipeline.write import (
        commit_shard,
        committed_shards,
        corpus_file,
        marker_files,
        table_file,
        write_table,
    )

    out = f"{s3}/protocol"
    rows = lambda n: [{"file_key": f"k{i}", "status": "ingested"} for i in range(n)]  # noqa: E731
    first = commit_shard(out, "shard-00000", {"files": rows(2)}, units={"u": "d0"})
    write_table(table_file(out, "files", "shard-00001"), rows(1), "files")  # killed: no marker
    assert list(committed_shards(out)[0]) == ["shard-00000"]

    redo = commit_shard(out, "shard-00000", {"files": rows(3)}, units={"u": "d1"}, attempt=1,
                        supersedes=marker_files(first))
    live, _ = committed_shards(out)
    assert live["shard-00000"] == redo and redo["tables"]["files"]["rows"] == 3
    assert _objects(f"{out}/files") == {f"{BUCKET}/protocol/files/shard-00000.r1.parquet",
                                        f"{BUCKET}/protocol/files/shard-00001.parquet"}
    body = storage.read_bytes(corpus_file(out, redo["tables"]["files"]["file"]))
    assert hashlib.sha256(body).hexdigest() == redo["tables"]["files"]["sha256"]
