"""One filesystem layer for sources and corpora: local paths, ``s3://`` and ``gs://`` URIs.

Everything that walks a source, writes a corpus or reads one back goes through here, over
``pyarrow.fs``. A location is a local path (``str`` or :class:`~pathlib.Path`) or a URI
(``s3://bucket/prefix``, ``gs://bucket/prefix``). Local locations stay :class:`Path` objects
(callers keep using them as paths); remote ones stay URI strings, which pyarrow, Polars and
:func:`pyarrow.parquet.ParquetFile` open as they are.

S3: pyarrow's own client, configured by the standard AWS variables: ``AWS_ENDPOINT_URL``
(an S3-compatible server: MinIO, Ceph, a test server), ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``
(or an instance role). GCS: ``GOOGLE_APPLICATION_CREDENTIALS`` or the metadata server. A
user's bucket and the test server go through the same code (docs/cluster.md).

Writes: :func:`put_bytes` is the one atomic act. Locally: a temporary name, fsync, rename.
On an object store there is no rename: an object appears whole when its PUT (or its
multipart upload) completes, so the object is written under its final name directly; the
commit protocol (``pipeline.write``) never overwrites a committed object, it writes attempt
-unique names and makes the small commit marker's PUT the commit.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs", "gcs")


def is_remote(location) -> bool:
    """True for ``s3://`` / ``gs://`` URIs (a local path never has a scheme)."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


def location(text) -> str | Path:
    """A command-line location: URIs stay strings (``Path`` would fold ``s3://`` to
    ``s3:/``), anything else is a :class:`Path`. ValueError for an unknown scheme."""
    scheme, sep, _ = str(text).partition("://")
    if sep and scheme.lower() not in REMOTE_SCHEMES:
        raise ValueError(f"{text}: unsupported scheme; use a local path, s3:// or gs://")
    return str(text).rstrip("/") if sep else Path(text)


def join(root, *parts: str) -> str | Path:
    """``root / parts`` for either kind of location (URIs joined with ``/``)."""
    if not is_remote(root):
        return Path(root, *parts)
    return "/".join([str(root).rstrip("/"), *(p.strip("/") for p in parts)])


def name(loc) -> str:
    """The last component of a location (``shard-00001.parquet``)."""
    return str(loc).rstrip("/").rpartition("/")[2]


@lru_cache(maxsize=32)
def _remote_fs(scheme: str, bucket: str, pid: int) -> pafs.FileSystem:
    """One client per bucket and process (the AWS variables are read when it is made; a forked
    child makes its own rather than use its parent's connections)."""
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}/")
    return fs


def resolve(loc) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a location, for ``pyarrow`` calls that take both."""
    if not is_remote(loc):
        return pafs.LocalFileSystem(), os.path.abspath(loc)
    scheme, _, rest = str(loc).partition("://")
    bucket = rest.partition("/")[0]
    return _remote_fs(scheme.lower(), bucket, os.getpid()), rest.rstrip("/")


def exists(loc) -> bool:
    fs, path = resolve(loc)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(loc) -> bool:
    fs, path = resolve(loc)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(loc) -> bool:
    """A folder, or on an object store a prefix with at least one object under it."""
    fs, path = resolve(loc)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(loc) -> bytes:
    fs, path = resolve(loc)
    with fs.open_input_stream(path, compression=None) as f:  # bytes as stored (no .gz guess)
        return f.read()


def read_text(loc) -> str:
    return read_bytes(loc).decode()


def makedirs(loc) -> None:
    """A local folder (with parents); nothing on an object store (prefixes are implicit)."""
    if not is_remote(loc):
        Path(loc).mkdir(parents=True, exist_ok=True)


def put_bytes(loc, data: bytes) -> None:
    """Write ``data`` to ``loc`` so that a reader sees the old bytes or the new, never a part:
    locally a temporary name, fsync and rename; on an object store one PUT."""
    if is_remote(loc):
        fs, path = resolve(loc)
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)
        return
    loc = Path(loc)
    tmp = loc.with_name(f".{loc.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, loc)


def delete(loc) -> None:
    """Remove a file or object; nothing when it is not there."""
    fs, path = resolve(loc)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def list_files(loc, recursive: bool = False) -> list[pafs.FileInfo]:
    """Files (objects) under folder (prefix) ``loc``, sorted by path; none when it is absent."""
    fs, path = resolve(loc)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def uri_of(loc, info_path: str) -> str | Path:
    """The location of a path ``list_files`` returned, in the kind of ``loc``."""
    if not is_remote(loc):
        return Path(info_path)
    return f"{str(loc).partition('://')[0]}://{info_path}"


def missing(locs: list) -> list:
    """The locations of ``locs`` that are not files (one batched metadata call per kind)."""
    if not locs:
        return []
    fs, _ = resolve(locs[0])
    infos = fs.get_file_info([resolve(x)[1] for x in locs])
    return [x for x, i in zip(locs, infos, strict=True) if i.type != pafs.FileType.File]
