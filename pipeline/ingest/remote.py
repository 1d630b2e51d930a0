"""Remote sources, read where they are used: listed on the driver, fetched by the workers.

A source root ``s3://bucket/prefix`` (or ``gs://``) is never copied whole. Discovery lists it
(:func:`pipeline.storage.list_files`: name, size and LastModified per object) and gives each
object a *virtual path*, the path a local copy of the bucket would have under
:data:`REMOTE_BASE`::

    s3://bucket/prefix/p1/IM1.dcm  <->  /regioncorpus-remote/s3/bucket/prefix/p1/IM1.dcm

so that discovery's rules by name (kinds, label pairing by parent and stem, root labels and
with them every file key) work on remote files unchanged, and a bucket keys its files as a
local copy of the same prefix does. Nothing exists at a virtual path. The process that reads a
file (a header-scan batch, a unit's worker) asks :func:`local_copies` for it: the objects are
fetched into a private temporary folder (``regioncorpus-fetch-<pid>-<random>`` under the node's
temporary folder, each copy named by a number and its format's suffix, never by the object's
name, which may hold a patient's name) and removed when the batch or unit is done, so a node
holds only the files it is working on and the driver never downloads a source. A fetch that
fails (the object gone since the listing, access refused) leaves no file: the reader then
reports a ``filesystem`` row, as for a local file that vanished. A folder's process holds a
lock on it while it is in use; folders whose lock nobody holds (their process was killed before
its cleanup) are removed by the next process that fetches on that node
(:func:`remove_orphans`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from pipeline import storage

REMOTE_BASE = Path("/regioncorpus-remote")
FETCH_PREFIX = "regioncorpus-fetch-"  # FETCH_PREFIX<pid>-<random>: one batch's or unit's copies
LOCK_NAME = "lock"  # in a fetch folder: locked by its process while the folder is in use
FETCH_THREADS = 8  # objects fetched at once by one process (a CT series is hundreds of GETs)
_CHUNK = 1 << 20
KEPT_SUFFIXES = (".nii.gz", ".nii", ".json", ".dcm")


def _suffix(path) -> str:
    """The part of a name readers go by (``.nii.gz`` tells nibabel the format), from a fixed
    list: nothing else of a source's name reaches a worker's disk."""
    name = PurePosixPath(path).name.lower()
    return next((s for s in KEPT_SUFFIXES if name.endswith(s)), "")


def virtual_root(uri: str) -> Path:
    """The virtual path of a remote location (``s3://b/p`` → ``REMOTE_BASE/s3/b/p``)."""
    scheme, _, rest = str(uri).partition("://")
    return REMOTE_BASE.joinpath(scheme.lower(), *[p for p in rest.split("/") if p])


def object_uri(path) -> str | None:
    """The object a virtual path stands for, None for a local path."""
    p = PurePosixPath(path)
    if not p.is_relative_to(REMOTE_BASE) or p == REMOTE_BASE:
        return None
    scheme, *rest = p.relative_to(REMOTE_BASE).parts
    return f"{scheme}://{'/'.join(rest)}"


def holds_name(uri: str) -> bool:
    """True when the object's name survives the trip to a path and back (no empty, ``.`` or
    ``..`` segment): only such objects can be told apart by their virtual paths."""
    scheme, _, rest = uri.partition("://")
    return all(part not in ("", ".", "..") for part in rest.split("/")) \
        and object_uri(virtual_root(uri)) == uri


def _held(folder: Path) -> bool:
    """True while the process that made ``folder`` lives: it holds an exclusive lock on the
    folder's ``lock`` file, which the kernel releases when the process ends however it ends
    (a process id would not do: pid namespaces share a node's temporary folder, and ids are
    reused). A folder without its lock file yet is being made: held."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return True  # cannot tell: keep it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock this call may have taken
    return False


def remove_orphans(parent: Path) -> int:
    """Delete the fetch folders under ``parent`` whose process is gone (killed before its
    cleanup: no process holds the folder's lock) → how many."""
    n = 0
    for d in parent.glob(f"{FETCH_PREFIX}*"):
        if d.is_dir() and not _held(d):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


_swept: set[int] = set()  # processes that have cleaned up their node's orphans once


def fetch(uri: str, dest: Path, scratch: Path, limit: int | None = None) -> bool:
    """Copy one object (its first ``limit`` bytes: one ranged GET) to ``dest`` → True; False
    (and no file) when it cannot be read. The bytes arrive in folder ``scratch`` first:
    ``dest`` appears whole or not at all."""
    fd, tmp = tempfile.mkstemp(dir=scratch)
    os.close(fd)
    tmp = Path(tmp)
    try:
        fs, path = storage.resolve(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(path, compression=None) as src, open(tmp, "wb") as out:
            if limit is not None:
                out.write(src.read(limit))
            else:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
        os.replace(tmp, dest)
        return True
    except (OSError, ValueError):  # pyarrow raises OSError subclasses for remote errors
        tmp.unlink(missing_ok=True)
        return False


@contextmanager
def local_copies(paths: Iterable[Path], limit: int | None = None) -> Iterator[dict[Path, Path]]:
    """``path → local path`` for every path given: a local path maps to itself; a virtual path
    to a fetched copy (which is missing when the fetch failed; only the object's first
    ``limit`` bytes when given) inside a private temporary folder, removed on exit, whatever
    happens in the block."""
    paths = list(dict.fromkeys(paths))
    remote = [(p, u) for p in paths if (u := object_uri(p)) is not None]
    if not remote:
        yield {p: p for p in paths}
        return
    parent = Path(tempfile.gettempdir())
    if os.getpid() not in _swept:
        remove_orphans(parent)
        _swept.add(os.getpid())
    here = Path(tempfile.mkdtemp(prefix=f"{FETCH_PREFIX}{os.getpid()}-", dir=parent))
    lock = os.open(here / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held until this block ends (or the process does)
    try:
        local = {p: p for p in paths}
        # copies named by number (no source name on the node's disk), partial downloads in
        # here/partial until whole
        local.update({p: here / f"{i:06d}{_suffix(p)}" for i, (p, _) in enumerate(remote)})
        scratch = here / "partial"
        scratch.mkdir()
        with ThreadPoolExecutor(min(FETCH_THREADS, len(remote))) as pool:
            list(pool.map(lambda pu: fetch(pu[1], local[pu[0]], scratch, limit), remote))
        yield local
    finally:
        shutil.rmtree(here, ignore_errors=True)
        os.close(lock)
