"""python -m workflows.bench_remote [--patients 8] [--matrix 96] [--workers 2]

A build from ``s3://`` against the same build from a local folder (issue 19): a phantom
collection (``pipeline.phantoms``) is uploaded to a moto S3 server started here on 127.0.0.1
(moto: the test extra), then build-corpus runs twice in fresh processes, ``--executor local``,
``--roi labels``: from the folder, and from ``s3://bench/src`` into ``s3://bench/out``. Reports
per build: wall seconds and the driver's peak RSS; for the S3 build also the bytes the workers
fetched against the bytes under the prefix (a DICOM object's header scan reads its first 64
KiB, the whole object only when that prefix did not reach its pixel data; its unit reads it
whole), the most bytes the fetch folders held at once (sampled every 20 ms) and whether any
fetch ran in the driver. Prints JSON. Wall times include moto's own CPU on the same cores: an
upper bound for a real object store's latency, not a measurement of one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BUILD = r"""
import json, os, resource, sys, time
from pipeline.ingest import remote
log = sys.argv[1]
fetch = remote.fetch
def logged(uri, dest, scratch, limit=None):
    ok = fetch(uri, dest, scratch, limit)
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {dest.stat().st_size if ok else 0}\n")
    return ok
remote.fetch = logged  # the forked workers inherit it
from workflows.build_corpus import main
t = time.monotonic()
rc = main(sys.argv[2:])
print(json.dumps({"rc": rc, "wall_s": round(time.monotonic() - t, 2), "driver_pid": os.getpid(),
                  "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10}))
"""


def _moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("bench_remote: the moto S3 server did not start") from None
            time.sleep(0.1)


def _peak_fetch_bytes(tmp: Path, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        total = 0
        for d in tmp.glob("regioncorpus-fetch-*"):
            for f in d.rglob("*"):
                try:
                    total += f.stat().st_size if f.is_file() else 0
                except OSError:
                    continue
        peak[0] = max(peak[0], total)
        time.sleep(0.02)


def _build(args: list[str], env: dict, log: Path, tmp: Path) -> dict:
    stop, peak = threading.Event(), [0]
    watcher = threading.Thread(target=_peak_fetch_bytes, args=(tmp, stop, peak), daemon=True)
    watcher.start()
    res = subprocess.run([sys.executable, "-c", BUILD, str(log), *args], env=env,
                         capture_output=True, text=True, check=True)
    stop.set()
    watcher.join()
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["peak_fetch_folder_mb"] = round(peak[0] / 2**20, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_remote", description=__doc__.split("\n\n")[1])
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--matrix", type=int, default=96)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    import pyarrow.fs as pafs

    from pipeline.phantoms.studies import make_phantoms
    from pipeline.write import read_manifest

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        src, tmp = d / "src", d / "tmp"
        tmp.mkdir()
        make_phantoms(src, patients=args.patients, seed=3, matrix=args.matrix)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = _moto(port)
        try:
            env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                   "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                   "TMPDIR": str(tmp), "REGIONCORPUS_KEY": "bench-remote-key-0123456789"}
            fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                   access_key="bench", secret_key="bench",
                                   allow_bucket_creation=True)
            fs.create_dir("bench")
            pafs.copy_files(str(src), "bench/src", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
            files = [f for f in src.rglob("*") if f.is_file()]
            source_bytes = sum(f.stat().st_size for f in files)
            common = ["--roi", "labels", "--executor", "local", "--workers", str(args.workers)]
            local = _build([str(src), "--out", str(d / "out"), *common], env, d / "l.log", tmp)
            remote = _build(["s3://bench/src", "--out", "s3://bench/out", *common], env,
                            d / "r.log", tmp)
            fetches = [line.split() for line in (d / "r.log").read_text().splitlines()]
            os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
            same = read_manifest(d / "out")["rows"] == read_manifest("s3://bench/out")["rows"]
        finally:
            proc.terminate()
            proc.wait(10)
    fetched = sum(int(b) for _, b in fetches)
    print(json.dumps({
        "patients": args.patients, "matrix": args.matrix, "workers": args.workers,
        "objects": len(files), "source_mb": round(source_bytes / 2**20, 2),
        "local": local, "s3": remote, "same_rows": same,
        "fetches": len(fetches), "fetched_mb": round(fetched / 2**20, 2),
        "fetched_over_source": round(fetched / source_bytes, 3),
        "fetches_in_driver": sum(pid == str(remote["driver_pid"]) for pid, _ in fetches),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
