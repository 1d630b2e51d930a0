"""Every file-system surprise is a files row, never a crashed build or a leaked name.

A generator of hostile trees (symlink loops, self and upward links, dangling links, fifos,
names that are not UTF-8, names with newlines, quotes and backslashes, a name of 255 bytes, an
empty file, a folder named like a DICOM file, unreadable entries when not run as root), each
beside one valid DICOM series, and all of them together. Every name carries a canary; after
``build-corpus`` no canary may appear in any byte of the output, the manifest or the console,
and every entry must have exactly one row, found by its keyed id (HMAC of the raw name bytes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from factories import PHI, ramp_volume, write_series

import pipeline.run.build
import pipeline.run.shards
from pipeline.errors import REASONS
from pipeline.ingest.deid import Deidentifier
from workflows.build_corpus import main

TAG = "CANARY_ZELDA^QUUX"  # in every name: a canary and a fake patient name
CANARIES = ["CANARY", "ZELDA", "QUUX", *PHI.values()]
IS_ROOT = os.geteuid() == 0  # root opens everything: the permission cases need another user


def _nifti() -> nib.Nifti1Image:
    """A small MR-like volume with signal (not constant, so not refused as blank)."""
    return nib.Nifti1Image(ramp_volume((4, 8, 8)).transpose(2, 1, 0).copy(), np.eye(4))


def _valid_series(root: Path) -> list[Path]:
    return write_series(root / f"{TAG}_series", ramp_volume((3, 16, 16)), series_uid="1.2.3.4.5")


def _dicom_bytes(root: Path) -> bytes:
    return next((root / f"{TAG}_series").iterdir()).read_bytes()


def _loop(root: Path) -> None:
    os.symlink(f"{TAG}_b.dcm", root / f"{TAG}_a.dcm")
    os.symlink(f"{TAG}_a.dcm", root / f"{TAG}_b.dcm")


def _self_link(root: Path) -> None:
    os.symlink(f"{TAG}_self.dcm", root / f"{TAG}_self.dcm")


def _links_up(root: Path) -> None:
    sub = root / f"{TAG}_sub"
    sub.mkdir()
    os.symlink("..", sub / f"{TAG}_up")  # a folder above, inside the root
    os.symlink("../..", sub / f"{TAG}_above_root")  # the root's parent
    os.symlink(f"../{TAG}_series/IM0000.dcm", sub / f"{TAG}_file_link.dcm")


def _dangling(root: Path) -> None:
    os.symlink(f"{TAG}_nowhere.dcm", root / f"{TAG}_dangling.dcm")


def _fifo(root: Path) -> None:
    os.mkfifo(root / f"{TAG}_fifo.dcm")


def _non_utf8(root: Path) -> None:
    base = os.fsencode(root)
    tag = TAG.encode()
    with open(base + b"/" + tag + b"_\xff\xfe.dcm", "wb") as f:
        f.write(_dicom_bytes(root))  # a readable image whose name is not UTF-8
    os.mkdir(base + b"/" + tag + b"_\xfe_dir")
    write_series(Path(os.fsdecode(base + b"/" + tag + b"_\xfe_dir")), ramp_volume((2, 8, 8)),
                 series_uid="1.2.3.4.77", names=[os.fsdecode(tag + b"_\xe9%d.dcm" % k)
                                                 for k in range(2)])
    nib.save(_nifti(), os.fsdecode(base + b"/" + tag + b"_\xff.nii.gz"))


def _odd_characters(root: Path) -> None:
    data = _dicom_bytes(root)
    for name in (f"{TAG}_new\nline.dcm", f"{TAG}_quo'te\".dcm", f"{TAG}_back\\slash.dcm",
                 f"{TAG}_tab\tand space .dcm", f"{TAG}_é.nii.gz"):
        (root / name).write_bytes(data[:700])  # truncated: a quarantined row with a message


def _long_name(root: Path) -> None:
    name = f"{TAG}_" + "x" * (250 - len(TAG)) + ".dcm"
    assert len(os.fsencode(name)) <= 255
    (root / name).write_bytes(_dicom_bytes(root))


def _empty(root: Path) -> None:
    (root / f"{TAG}_empty.dcm").write_bytes(b"")
    (root / f"{TAG}_empty.nii.gz").write_bytes(b"")


def _folder_like_a_file(root: Path) -> None:
    folder = root / f"{TAG}_folder.dcm"
    folder.mkdir()
    (folder / f"{TAG}_inside.txt").write_text(TAG)
    (root / f"{TAG}_empty_folder.nii.gz").mkdir()


def _unreadable(root: Path) -> None:
    locked = root / f"{TAG}_locked"
    write_series(locked, ramp_volume((2, 8, 8)), series_uid="1.2.3.4.88")
    os.chmod(locked, 0)
    secret = root / f"{TAG}_secret.dcm"
    secret.write_bytes(_dicom_bytes(root))
    os.chmod(secret, 0)


CASES = {
    "loop": _loop, "self_link": _self_link, "links_up": _links_up, "dangling": _dangling,
    "fifo": _fifo, "non_utf8": _non_utf8, "odd_characters": _odd_characters,
    "long_name": _long_name, "empty": _empty, "folder_like_a_file": _folder_like_a_file,
    "unreadable": _unreadable,
}


def hostile_tree(root: Path, cases) -> Path:
    """``root`` with the valid series and every hostile case of ``cases`` (names of CASES)."""
    root.mkdir(parents=True)
    _valid_series(root)
    for name in cases:
        CASES[name](root)
    return root


def _expected_keys(root: Path, deid: Deidentifier) -> dict[str, bytes]:
    """Keyed id → raw relative name of every entry a build must account for: each
    non-folder entry, and each folder link (walked with bytes, independently of discovery).
    A folder that cannot be listed is one entry."""
    out, base = {}, os.fsencode(root)

    def add(path: bytes) -> None:
        rel = os.fsencode(root.name) + b"/" + os.path.relpath(path, base)
        out[deid.pseudonym("file", rel)] = rel

    def unlisted(err: OSError) -> None:
        add(os.fsencode(err.filename))

    for here, dirs, files in os.walk(base, onerror=unlisted):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(here, d))]:
            add(os.path.join(here, name))
    return out


def _outputs(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()]


def leaks(out: Path, console: str) -> list[str]:
    """Where a canary appears: the console, an output's name, its bytes, or a Parquet table's
    decoded rows (its pages are compressed); each as "where: canary ...context..."."""
    texts = {"console": console}
    for p in _outputs(out):
        name = os.fsdecode(p.relative_to(out))
        texts[f"name {name}"] = name
        texts[name] = p.read_bytes().decode("latin-1")
        if p.suffix == ".parquet":
            texts[f"rows of {name}"] = repr(pq.read_table(p).to_pylist())
    found = []
    for where, text in texts.items():
        up = text.upper()
        for c in CANARIES:
            if (i := up.find(c.upper())) >= 0:
                found.append(f"{where}: {c} ...{text[max(0, i - 80):i + 40]!r}")
    return found


def _files(out: Path) -> list[dict]:
    return pq.read_table(out / "files").to_pylist()


def build_and_check(src: Path, out: Path, capfd) -> dict[bytes, dict]:
    """Build ``src`` and check the invariants of every hostile build: exit 0, a manifest, one
    row per entry (matched by keyed id), reasons from REASONS, no canary anywhere. Returns
    the rows by raw relative name."""
    expected = _expected_keys(src, Deidentifier.from_env())  # before: a file may vanish
    code = main([str(src), "--out", str(out), "--workers", "2"])
    console = "".join(capfd.readouterr())
    assert code == 0, console[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    rows = _files(out)
    by_key = {r["file_key"]: r for r in rows}
    assert len(by_key) == len(rows) == manifest["found"] == len(expected)
    assert set(by_key) == set(expected), "rows do not match the entries one to one"
    assert manifest["complete"]
    for r in rows:
        assert r["reason"] in REASONS and r["status"] in ("ingested", "quarantined", "skipped")
        assert r["error"] is None or r["error"] in REASONS.values() or r["error"].isprintable()
    leaked = leaks(out, console)
    assert not leaked, "canaries reached the outputs or the console:\n" + "\n".join(leaked)
    return {expected[k]: r for k, r in by_key.items()}


def _valid_ingested(rows: dict) -> None:
    series = [r for rel, r in rows.items() if f"{TAG}_series/".encode() in rel]
    assert len(series) == 3 and all(r["status"] == "ingested" for r in series)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_hostile_case_is_rows_not_a_crash(tmp_path, capfd, case):
    if case == "unreadable" and IS_ROOT:
        pytest.skip("root reads every file: permissions cannot refuse it")
    src = hostile_tree(tmp_path / "src", [case])
    rows = build_and_check(src, tmp_path / "out", capfd)
    _valid_ingested(rows)
    reasons = {rel.rsplit(b"/", 1)[-1]: r["reason"] for rel, r in rows.items()}
    tag = TAG.encode()
    if case in ("loop", "self_link"):
        assert {v for k, v in reasons.items() if k.startswith(tag)} == {"filesystem"}
    if case == "dangling":
        assert reasons[tag + b"_dangling.dcm"] == "not_regular"
    if case == "fifo":
        assert reasons[tag + b"_fifo.dcm"] == "not_regular"
    if case == "links_up":
        assert reasons[tag + b"_up"] == "not_regular"
        assert reasons[tag + b"_above_root"] == "symlink_outside_root"
    if case == "non_utf8":  # names that are not UTF-8 are read like any other
        assert reasons[tag + b"_\xff\xfe.dcm"] == "ok"
        assert reasons[tag + b"_\xff.nii.gz"] == "ok"
        assert [reasons[tag + b"_\xe9%d.dcm" % k] for k in range(2)] == ["ok", "ok"]
    if case == "long_name":
        assert reasons[tag + b"_" + b"x" * (250 - len(TAG)) + b".dcm"] == "ok"
    if case == "unreadable":
        assert reasons[tag + b"_locked"] == "filesystem"
        assert reasons[tag + b"_secret.dcm"] == "filesystem"


def test_all_hostile_cases_together(tmp_path, capfd):
    cases = [c for c in sorted(CASES) if not (c == "unreadable" and IS_ROOT)]
    src = hostile_tree(tmp_path / "src", cases)
    rows = build_and_check(src, tmp_path / "out", capfd)
    _valid_ingested(rows)
    assert {"filesystem", "not_regular", "symlink_outside_root", "ok"} <= {
        r["reason"] for r in rows.values()}


@pytest.mark.parametrize("victim", ["IM0002.dcm", "volume.nii.gz"])
def test_file_vanishing_after_discovery_is_a_filesystem_row(tmp_path, capfd, monkeypatch,
                                                             victim):
    src = hostile_tree(tmp_path / "src", [])
    (src / f"{TAG}_vol").mkdir()
    nib.save(_nifti(), src / f"{TAG}_vol" / "volume.nii.gz")
    gone = next(p for p in src.rglob("*") if p.name == victim)
    plan_units = pipeline.run.build.plan_units

    def plan_then_delete(*args, **kwargs):
        units = plan_units(*args, **kwargs)
        gone.unlink()  # discovered and grouped, then gone before a worker opens it
        return units

    monkeypatch.setattr(pipeline.run.build, "plan_units", plan_then_delete)
    rows = build_and_check(src, tmp_path / "out", capfd)
    rel = os.fsencode(gone.relative_to(src.parent))
    assert (rows[rel]["status"], rows[rel]["reason"]) == ("quarantined", "filesystem")
    others = [r for k, r in rows.items() if k != rel and k.endswith((b".dcm", b".nii.gz"))]
    assert others and all(r["status"] == "ingested" for r in others)


# ----------------------------------------------------------------------------- fault injection

def _faults():
    """Every path operation discovery makes × every kind of error the OS or pathlib raises."""
    errors = [PermissionError(13, "denied"), OSError(40, "loop"), OSError(36, "name too long"),
              FileNotFoundError(2, "gone"), RuntimeError("Symlink loop"),
              UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")]
    for method in ("lstat", "resolve", "stat"):
        for err in errors:
            yield pytest.param(method, err, id=f"{method}-{type(err).__name__}-{err.args[0]}")


@pytest.mark.parametrize("method,error", list(_faults()))
def test_any_error_of_any_path_operation_is_a_filesystem_entry(tmp_path, monkeypatch, method,
                                                                error):
    from pipeline.ingest.discover import walk

    root = tmp_path / "src"
    _valid_series(root)
    victim = root / f"{TAG}_victim.dcm"
    victim.write_bytes(b"x")
    if method == "resolve":
        os.symlink(f"{TAG}_series/IM0000.dcm", victim.with_suffix(".link"))
        victim = victim.with_suffix(".link")  # resolve is called on links only
    real = getattr(Path, method)

    def failing(self, *args, **kwargs):
        if self.name == victim.name:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, failing)
    entries = walk([root], Deidentifier.from_env())
    by_name = {e.path.name: e for e in entries}
    hit = by_name[victim.name]
    assert (hit.status, hit.reason, hit.error) == ("quarantined", "filesystem",
                                                     REASONS["filesystem"])
    assert all(e.status is None for n, e in by_name.items() if n != victim.name)


def test_a_folder_that_cannot_be_listed_is_one_filesystem_entry(tmp_path, monkeypatch):
    from pipeline.ingest.discover import walk

    root = tmp_path / "src"
    _valid_series(root)
    write_series(root / f"{TAG}_locked", ramp_volume((2, 8, 8)), series_uid="1.2.3.4.88")
    real = os.scandir

    def scandir(path="."):
        if os.fsdecode(path).endswith("_locked"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    entries = walk([root], Deidentifier.from_env())
    locked = [e for e in entries if e.status]
    assert [(e.path.name, e.reason) for e in locked] == [(f"{TAG}_locked", "filesystem")]
    assert len(entries) == 4  # the three slices and the folder


def test_a_names_sidecar_that_cannot_be_opened_is_a_filesystem_error(tmp_path):
    from pipeline.errors import IngestError
    from pipeline.labels.nifti import label_names_from_json

    with pytest.raises(IngestError) as err:
        label_names_from_json(tmp_path / f"{TAG}_gone.json")
    assert err.value.reason == "filesystem" and TAG not in err.value.message
