"""Memory bombs: files of a few MB that declare GiBs. Each is one files row with a reason code,
the build completes with a manifest, and the peak memory of the whole process tree (the build
and every worker it forks) stays under a stated budget, measured here by polling psutil (PSS).

The bombs are written as streams (zlib / gzip of zeros in chunks), so the test process itself
never holds what they declare:
* a Deflated-transfer-syntax DICOM whose data set inflates to 1.5 GiB;
* a 64² DICOM whose JPEG codestream's SOF declares 32000²;
* a .nii.gz declaring 1024 × 1024 × 800 int16 with scl_slope: past the series budget at the
  reader's 6 bytes per voxel (stored int16 + float32), refused before a voxel is read;
* the same at 1024 × 1024 × 400 (the issue's file: 3.2 GiB as float64, 6.1 GiB peak before):
  within the budget, so it is read — into float32, slab by slab, never float64 — and refused
  as ``no_signal`` (it is all zeros).
"""

from __future__ import annotations

import gzip
import io
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pyarrow.parquet as pq
import pydicom
from factories import ct_slice, ramp_volume, write_series
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit

REPO = Path(__file__).resolve().parents[3]
BUDGET = 9 << 29  # 4.5 GiB: PSS of the build's process tree, summed (shared pages split)
CHUNK = 16 << 20


def deflate_bomb(path: Path, rows=8192, cols=8192, frames=12) -> None:
    """A CT data set whose pixel data (rows × cols × frames × 2 bytes) is zeros, deflated."""
    ds = ct_slice(np.zeros((1, 1), np.int16), (0.0, 0.0, 0.0))
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    fp = pydicom.filebase.DicomFileLike(head)
    fp.is_little_endian, fp.is_implicit_VR = True, False  # what Deflated Explicit VR LE deflates
    write_dataset(fp, ds)
    n = rows * cols * frames * 2
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(pydicom.filebase.DicomFileLike(f), ds.file_meta)
        f.write(comp.compress(head.getvalue()))
        f.write(comp.compress(b"\xe0\x7f\x10\x00OW\0\0" + struct.pack("<I", n)))
        zeros = bytes(CHUNK)
        for _ in range(n // CHUNK):
            f.write(comp.compress(zeros))
        f.write(comp.compress(bytes(n % CHUNK)) + comp.flush())


def jpeg_sof_bomb(path: Path, side=32000) -> None:
    """A 64² slice whose one JPEG frame declares ``side``² (SOF0, no scan)."""
    sof = struct.pack(">BHHB", 8, side, side, 1) + bytes([1, 0x11, 0])
    frame = b"\xff\xd8\xff\xc0" + struct.pack(">H", 2 + len(sof)) + sof + b"\xff\xd9"
    ds = ct_slice(np.zeros((64, 64), np.int16), (0.0, 0.0, 0.0), series_uid="1.2.3.9")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([frame + b"\0" * (len(frame) % 2)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def nifti_bomb(path: Path, shape=(1024, 1024, 400)) -> None:
    """int16 zeros declaring ``shape`` with scl_slope 2.0 (scaling makes it float64)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr["scl_slope"], hdr["scl_inter"] = 2.0, 0.0
    hdr["vox_offset"] = 352
    n = int(np.prod(shape)) * 2
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(hdr.binaryblock + b"\0" * 4)
        zeros = bytes(CHUNK)
        for _ in range(n // CHUNK):
            f.write(zeros)
        f.write(bytes(n % CHUNK))


def tree_memory(proc: psutil.Process) -> int:
    """Proportional set size of ``proc`` and its descendants: a page shared by n processes
    (the forked workers share the build's imports) counts 1/n in each, so the sum is what the
    tree holds (RSS summed counts shared pages once per process and drifts with the venv)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str]) -> tuple[int, int]:
    """(exit status, peak summed PSS of the process tree) of ``cmd``, polled every 20 ms."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps, peak, done = psutil.Process(proc.pid), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], tree_memory(ps))
            done.wait(0.02)

    t = threading.Thread(target=poll)
    t.start()
    try:
        rc = proc.wait(timeout=600)
    finally:
        done.set()
        t.join()
    return rc, peak[0]


def test_memory_bombs_are_rows_and_the_build_stays_under_budget(tmp_path):
    src = tmp_path / "src"
    write_series(src / "ok", ramp_volume((3, 16, 16)))
    deflate_bomb(src / "deflate.dcm")
    jpeg_sof_bomb(src / "sof.dcm")
    nifti_bomb(src / "big.nii.gz")
    nifti_bomb(src / "huge.nii.gz", shape=(1024, 1024, 800))
    assert sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) < 16 << 20
    out = tmp_path / "out"
    rc, peak = run_measured([sys.executable, "-m", "workflows.build_corpus", str(src),
                             "--out", str(out), "--executor", "local", "--workers", "2"])
    assert rc == 0 and (out / "manifest.json").is_file()
    assert peak < BUDGET, f"process tree peaked at {peak / 2**30:.2f} GiB"
    rows = pq.read_table(out / "files").to_pylist()
    assert len(rows) == 3 + 4  # the series' slices and the four bombs, one row each
    refused = sorted(r["reason"] for r in rows if r["status"] != "ingested")
    assert refused == ["no_signal"] + ["size_budget"] * 3


def test_files_larger_than_the_series_budget_are_refused_by_their_size(tmp_path):
    """A candidate file bigger than the series budget (+ a header's slack) cannot pass the
    reader's budget checks: it is a ``size_budget`` row from the walk, before anything opens it
    (from object storage: before anything fetches it). Sparse files: nothing is written."""
    from pipeline.config import BuildConfig, ExecConfig
    from pipeline.ingest.read import ReadConfig
    from pipeline.phantoms.studies import make_phantoms
    from pipeline.run.build import FILE_SLACK_BYTES, build
    from pipeline.write import read_table

    src = tmp_path / "src"
    make_phantoms(src, patients=1, seed=2, matrix=32)
    budget = 1 << 20
    big = {"IM-big.dcm": budget + FILE_SLACK_BYTES + 1, "big.nii.gz": 1 << 40,
           "names_seg.json": budget + FILE_SLACK_BYTES + 1}
    for name, size in big.items():
        with open(src / name, "wb") as f:
            f.truncate(size)
    with open(src / "IM-edge.dcm", "wb") as f:  # at the limit: read (and refused as unreadable)
        f.truncate(budget + FILE_SLACK_BYTES)
    manifest = build(BuildConfig(sources=(src,), out=tmp_path / "out",
                                 read=ReadConfig(series_budget_bytes=budget),
                                 execution=ExecConfig(executor="local", workers=1)))
    assert manifest["complete"] and manifest["rows"]["regions"] > 0
    rows = {r["size_bytes"]: r for r in read_table(tmp_path / "out", "files")}
    for size in big.values():
        assert (rows[size]["status"], rows[size]["reason"], rows[size]["error"]) == (
            "quarantined", "size_budget", "file larger than the series byte budget")
    assert rows[budget + FILE_SLACK_BYTES]["reason"] != "size_budget"
