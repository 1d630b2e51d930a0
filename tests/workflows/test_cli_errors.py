"""Every console entry point reports a user error the same way: one line of stderr,
``PROG: error: ...`` naming the flag and the bad value, exit status 2, no traceback, nothing
written, and nothing read from a file quoted (every fixture file carries a canary)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.write import commit_shard
from workflows import (
    browse_catalog,
    build_corpus,
    evaluate_model,
    make_phantoms,
    train_detector,
    train_model,
)

MAINS = {"make-phantoms": make_phantoms.main, "build-corpus": build_corpus.main,
         "train-detector": train_detector.main, "browse-catalog": browse_catalog.main,
         "train-model": train_model.main, "evaluate-model": evaluate_model.main}
CANARY = "CANARY7F3A"  # in every fixture file's contents; never in an error message

EVAL = ["--corpus", "{corpus}", "--run", "{run}", "--out", "{out}/report.json"]
DET = ["--corpus", "{labelled}", "--out", "{out}"]
TRAIN = ["--corpus", "{corpus}", "--out", "{out}"]

# (prog, argv, flag, bad value): each passes argparse and fails validation. {out} is the
# command's output folder; the other placeholders are fixture paths (see _fixtures).
CASES = [
    ("make-phantoms", ["--out", "{out}", "--patients", "0"], "--patients", "0"),
    ("make-phantoms", ["--out", "{out}", "--seed", "-3"], "--seed", "-3"),
    ("make-phantoms", ["--out", "{out}", "--matrix", "8"], "--matrix", "8"),
    ("make-phantoms", ["--out", "{out}", "--workers", "0"], "--workers", "0"),
    ("make-phantoms", ["--out", "{file}"], "--out", "{file}"),
    ("build-corpus", ["{src}", "--out", "{out}", "--roi", "nope"], "--roi", "nope"),
    ("build-corpus", ["{src}", "--out", "{out}", "--split", "0.5,0.2"], "--split", "0.5,0.2"),
    ("build-corpus", ["{src}", "--out", "{out}", "--split", "a,b,c"], "--split", "a,b,c"),
    ("build-corpus", ["{tmp}/missing", "--out", "{out}"], "SOURCE", "{tmp}/missing"),
    ("build-corpus", ["{src}", "--out", "{out}", "--detector", "{tmp}/no.pt"], "--detector",
     "{tmp}/no.pt"),
    ("build-corpus", ["{src}", "--out", "{out}", "--unit-memory-mb", "1"], "--unit-memory-mb",
     "1"),
    ("train-detector", [*DET, "--epochs", "0"], "--epochs", "0"),
    ("train-detector", [*DET, "--imgsz", "100"], "--imgsz", "100"),
    ("train-detector", [*DET, "--conf", "2"], "--conf", "2"),
    ("train-detector", ["--corpus", "{tmp}/nope", "--out", "{out}"], "--corpus", "{tmp}/nope"),
    ("train-detector", ["{src}", *DET], "SOURCE/--corpus", None),
    ("train-detector", ["--corpus", "{tmp}/images_only", "--out", "{out}"], "--corpus",
     "{tmp}/images_only"),
    # found only once the corpus is read: no lesion-like label (the labels are canaries)
    ("train-detector", ["--corpus", "{labelled}", "--out", "{out}"], "--classes", None),
    ("train-detector", ["--corpus", "{labelled}", "--out", "{out}", "--classes", "spleen_mass"],
     "--classes", "spleen_mass"),
    ("browse-catalog", ["{catalog}", "--page-size", "0"], "--page-size", "0"),
    ("browse-catalog", ["{catalog}", "--limit", "-1", "--html", "{out}"], "--limit", "-1"),
    ("browse-catalog", ["{catalog}", "--max-distance", "-1"], "--max-distance", "-1"),
    ("browse-catalog", ["{catalog}", "--html", "{file}"], "--html", "{file}"),
    ("browse-catalog", ["{catalog}", "--where", "nope = 1", "--html", "{out}"], "--where",
     "nope"),
    ("browse-catalog", ["{tmp}/nothing", "--html", "{out}"], "DIR", "{tmp}/nothing"),
    ("browse-catalog", ["{src}", "--html", "{out}"], "DIR", "{src}"),
    ("browse-catalog", ["{broken}", "--html", "{out}"], "DIR", "{broken}"),
    ("train-model", [*TRAIN, "--device", "floppy"], "--device", "floppy"),
    ("train-model", ["--corpus", "{tmp}/nope", "--out", "{out}"], "--corpus", "{tmp}/nope"),
    ("train-model", [*TRAIN, "--text-weights", "{tmp}/bert"], "--text-weights", "{tmp}/bert"),
    ("train-model", [*TRAIN, "--address", "local", "--ray-workers", "0"], "--ray-workers", "0"),
    ("evaluate-model", [*EVAL, "--split", "nope"], "--split", "nope"),
    ("evaluate-model", [*EVAL, "--device", "floppy"], "--device", "floppy"),
    ("evaluate-model", [*EVAL, "--baseline", "{tmp}/norun"], "--baseline", "{tmp}/norun"),
    ("evaluate-model", ["--corpus", "{corpus}", "--run", "{tmp}/norun", "--out", "{out}/r.json"],
     "--run", "{tmp}/norun"),
    ("evaluate-model", ["--corpus", "{src}", "--run", "{run}", "--out", "{out}/r.json"],
     "--corpus", "{src}"),
    ("evaluate-model", ["--corpus", "{corpus}", "--run", "{run}", "--out", "{src}"], "--out",
     "{src}"),
]


def _fixtures(tmp: Path) -> dict[str, str]:
    """Valid-looking inputs, each carrying CANARY in its contents."""
    (tmp / "src").mkdir()
    (tmp / "src" / "slice.dcm").write_text(CANARY)
    (tmp / "file").write_text(CANARY)
    (tmp / "corpus" / "images").mkdir(parents=True)
    (tmp / "corpus" / "manifest.json").write_text('{"shards": {}}')  # a corpus's mark
    (tmp / "images_only" / "images").mkdir(parents=True)  # no manifest: not a corpus
    (tmp / "run" / "ckpt").mkdir(parents=True)
    (tmp / "run" / "ckpt" / "last.pt").write_text(CANARY)
    (tmp / "catalog").mkdir()
    (tmp / "catalog" / "manifest.json").write_text(json.dumps({"shards": {}, "note": CANARY}))
    (tmp / "broken").mkdir()  # its manifest lists a file that is not there
    shard = {"tables": {"images": {"file": f"images/{CANARY}.parquet", "rows": 1}}}
    (tmp / "broken" / "manifest.json").write_text(json.dumps({"shards": {CANARY: shard}}))
    image = {"image_id": "i0", "patient_key": "P0", "split": "test", "height": 8, "width": 8,
             "image": {"bytes": CANARY.encode(), "path": None}, "pixel_spacing_mm": [1.0, 1.0]}
    region = {"region_id": "r0", "image_id": "i0", "label": f"{CANARY}_organ",
              "source": "labels", "bbox": [0.0, 0.0, 4.0, 4.0]}
    marker = commit_shard(tmp / "labelled", "shard-00000",
                          {"images": [image], "regions": [region]})
    (tmp / "labelled" / "manifest.json").write_text(json.dumps({"shards": {"shard-00000":
                                                                           marker}}))
    names = ("src", "file", "corpus", "run", "catalog", "broken", "labelled")
    return {"tmp": str(tmp), "out": str(tmp / "out"), **{n: str(tmp / n) for n in names}}


def _fill(text: str, paths: dict[str, str]) -> str:
    for name, path in paths.items():
        text = text.replace(f"{{{name}}}", path)
    return text


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def _status(main, argv: list[str]) -> int:
    """The exit status ``main(argv)`` returns or exits with (SystemExit, as argparse does)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("prog, argv, flag, value", CASES,
                         ids=[f"{c[0]}:{c[2]}:{i}" for i, c in enumerate(CASES)])
def test_bad_flag_is_one_line_exit_2(tmp_path, capsys, prog, argv, flag, value):
    paths = _fixtures(tmp_path)
    before = _files(tmp_path)
    capsys.readouterr()
    status = _status(MAINS[prog], [_fill(a, paths) for a in argv])
    out, err = capsys.readouterr()
    assert status == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert err.startswith(f"{prog}: error: ") and flag in err, err
    if value is not None:
        assert _fill(value, paths) in err
    assert "Traceback" not in err and CANARY not in err + out
    assert not Path(paths["out"]).exists()
    assert _files(tmp_path) == before  # nothing written anywhere


@pytest.mark.parametrize("prog", sorted(MAINS))
@pytest.mark.parametrize("bad", [["--no-such-flag"], ["--seed", "x"]])
def test_argparse_errors_keep_the_format(tmp_path, capsys, prog, bad):
    """argparse's own errors (usage lines, then ``PROG: error: ...``) exit 2 too."""
    status = _status(MAINS[prog], [str(tmp_path), "--out", str(tmp_path / "out"), *bad])
    err = capsys.readouterr().err
    assert status == 2
    assert err.splitlines()[-1].startswith(f"{prog}: error: ") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


SUBPROCESS = [("make-phantoms", "make_phantoms", ["--out", "{out}", "--patients", "0"]),
              ("build-corpus", "build_corpus", ["{src}", "--out", "{out}", "--roi", "nope"]),
              ("train-detector", "train_detector", [*DET, "--epochs", "0"]),
              ("browse-catalog", "browse_catalog", ["{catalog}", "--page-size", "0"]),
              ("train-model", "train_model", [*TRAIN, "--device", "floppy"]),
              ("evaluate-model", "evaluate_model", [*EVAL, "--split", "nope"])]


@pytest.mark.parametrize("prog, module, argv", SUBPROCESS, ids=[c[0] for c in SUBPROCESS])
def test_process_exit_status(tmp_path, prog, module, argv):
    """The real process: status 2 from ``sys.exit(main())``, one line, no traceback."""
    paths = _fixtures(tmp_path)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", f"workflows.{module}",
                           *(_fill(a, paths) for a in argv)],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{prog}: error: --")
    assert "Traceback" not in proc.stderr and not Path(paths["out"]).exists()
