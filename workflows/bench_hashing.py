"""python -m workflows.bench_hashing DIR [--size 512] [--rounds 5]

Perceptual hashes and popcount as written in catalogs/verify.py against the maintained
libraries: pHash / dHash by hand (numpy + OpenCV) vs ``imagehash`` (PIL + scipy), and popcount
by a 256-entry byte table vs ``np.bitwise_count`` (numpy >= 2). Images: every non-flat PNG of
the corpus DIR, as stored and resized to ``--size`` pixels square. Prints microseconds per
image (best of ``--rounds``), how many bits the two pHash implementations differ by on the
same image, how many bits σ = 3 grey levels of noise moves each, and the popcount rate over
2048 × 2048 words. ``imagehash`` is not a dependency: without it those columns are skipped
(``pip install imagehash``). Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import cv2
import numpy as np


def best_us(fn, items, rounds: int) -> float:
    """Best mean time per item over ``rounds`` passes, microseconds."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for x in items:
            fn(x)
        times.append((time.perf_counter() - t) / len(items))
    return round(min(times) * 1e6, 1)


def library_hashes():
    """{"phash": fn, "dhash": fn} from imagehash (8-bit input, as it converts to "L"), or {}."""
    try:
        import imagehash
        from PIL import Image
    except ImportError:
        return {}

    def wrap(fn):
        return lambda g: int(str(fn(Image.fromarray(np.clip(g, 0, 255).astype(np.uint8)))), 16)

    return {"phash": wrap(imagehash.phash), "dhash": wrap(imagehash.dhash)}


def bits(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def hashes(grays: list[np.ndarray], rounds: int) -> dict:
    from catalogs import verify

    ours = {"phash": verify.phash64, "dhash": verify.dhash64}
    lib = library_hashes()
    out = {}
    for name, fn in ours.items():
        out[f"{name}_by_hand_us"] = best_us(fn, grays, rounds)
        if name in lib:
            out[f"{name}_imagehash_us"] = best_us(lib[name], grays, rounds)
    rng = np.random.default_rng(0)
    noisy = [np.clip(g + rng.normal(0, 3, g.shape), 0, 255).astype(np.float32) for g in grays]
    for label, fn in (("by_hand", ours["phash"]), ("imagehash", lib.get("phash"))):
        if fn is not None:
            moved = [bits(fn(g), fn(n)) for g, n in zip(grays, noisy, strict=True)]
            out[f"phash_{label}_noise_bits_p50_p95"] = [int(np.median(moved)),
                                                        int(np.percentile(moved, 95))]
    if "phash" in lib:
        apart = [bits(ours["phash"](g), lib["phash"](g)) for g in grays]
        out["phash_by_hand_vs_imagehash_bits_p50_max"] = [int(np.median(apart)), max(apart)]
    return out


def popcount(words: int = 2048) -> dict:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**63, (words, words), dtype=np.uint64)
    table = np.array([bin(i).count("1") for i in range(256)], np.int64)
    fns = {"byte_table": lambda v: table[v[..., None].view(np.uint8)].sum(-1)}
    if hasattr(np, "bitwise_count"):
        fns["np_bitwise_count"] = lambda v: np.bitwise_count(v).astype(np.int64)
    out = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn(x)
        out[f"popcount_{name}_Mwords_per_s"] = round(x.size / (time.perf_counter() - t) / 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_hashing", description=__doc__.split("\n\n")[1])
    p.add_argument("dir", type=Path, help="corpus directory (has manifest.json)")
    p.add_argument("--size", type=int, default=512, help="second pass: images resized to this")
    p.add_argument("--rounds", type=int, default=5, help="passes; the best is reported")
    args = p.parse_args(argv)
    from catalogs.corpus import Corpus
    from catalogs.verify import BLANK_STD, decode_png

    grays = [decode_png(png) for _, png in Corpus.open(args.dir).iter_image_bytes()]
    grays = [g for g in grays if g.std() >= BLANK_STD]
    resized = [cv2.resize(g, (args.size, args.size), interpolation=cv2.INTER_LINEAR)
               for g in grays]
    report = {"machine": f"{platform.machine()}, {cv2.getNumberOfCPUs()} CPUs",
              "numpy": np.__version__, "images": len(grays),
              f"stored_{grays[0].shape[1]}x{grays[0].shape[0]}": hashes(grays, args.rounds),
              f"resized_{args.size}x{args.size}": hashes(resized, args.rounds), **popcount()}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
