"""Requests that cannot be met, and reruns that would destroy work, are refused before any work:
exit status 2, exactly one stderr line ``PROG: error: ...`` naming the flag, no traceback, and
every file untouched (a hash of the whole tree, contents and modes, before and after).

Covers: train-model / make-phantoms into an earlier run (--resume, --overwrite); devices that
are not here (--device cuda, cuda:N, mps); GPUs the model stage would wait for forever
(--model-actors x --gpus-per-actor, against this machine and against a cluster's resources);
weights and checkpoints that are missing or unreadable (--segmenter sam:PATH, --detector,
--image-weights, --text-weights); an unknown --segmenter; evaluate-model on a split without
patients; browse-catalog --json printing one JSON document.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.checkpoint import RUN_FILES
from pipeline import config as pconfig
from pipeline.config import BuildConfig, ExecConfig, RequestError, check_cluster_gpus
from pipeline.roi.regions import RegionConfig
from workflows import browse_catalog, build_corpus, evaluate_model, make_phantoms, train_model

ROOT = Path(__file__).resolve().parents[2]
CANARY = "CANARY5E1D"  # in every fixture file; never in an error message


def tree_hash(root: Path) -> str:
    """SHA-256 over every path under ``root``: kind, name, mode, contents or link target."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            h.update(f"L {rel} {os.readlink(p)}\n".encode())
        elif p.is_dir():
            h.update(f"D {rel} {p.stat().st_mode:o}\n".encode())
        else:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            h.update(f"F {rel} {p.stat().st_mode:o} {digest}\n".encode())
    return h.hexdigest()


def refused(main, argv: list[str], prog: str, flag: str, root: Path, capsys) -> str:
    """Run ``main(argv)`` and assert the refusal contract; returns the stderr line."""
    before = tree_hash(root)
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    out, err = capsys.readouterr()
    assert status == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert err.startswith(f"{prog}: error: ") and flag in err, err
    assert "Traceback" not in err and CANARY not in out + err
    assert tree_hash(root) == before  # nothing written, nothing deleted
    return err


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    """A source folder, a corpus-looking folder, a run folder with a checkpoint, a plain file,
    a folder and a dangling link, each file carrying CANARY."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.dcm").write_text(CANARY)
    (tmp_path / "corpus" / "images").mkdir(parents=True)
    (tmp_path / "corpus" / "manifest.json").write_text('{"shards": {}}')  # a corpus's mark
    (tmp_path / "run" / "ckpt").mkdir(parents=True)
    (tmp_path / "run" / "ckpt" / "last.pt").write_text(CANARY)
    (tmp_path / "file.pt").write_text(CANARY)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x").write_text(CANARY)
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "gone.pt")
    names = ("src", "corpus", "run", "file.pt", "folder", "dangling.pt")
    return {"tmp": tmp_path, "missing": tmp_path / "missing.pt",
            **{n.split(".")[0]: tmp_path / n for n in names}}


def _build(p, *extra):
    return [p["src"], "--out", p["tmp"] / "out", *extra]


def _train(p, out=None, *extra):
    return ["--corpus", p["corpus"], "--out", out or p["tmp"] / "newrun", *extra]


# -- reruns that would destroy work ---------------------------------------------------------------

@pytest.mark.parametrize("artifact", RUN_FILES)
def test_train_model_refuses_an_earlier_run(paths, capsys, artifact):
    """Any one of a run's files in --out makes it a run: refused without --resume/--overwrite."""
    run = paths["tmp"] / "old"
    target = run / artifact
    if "." in artifact:
        run.mkdir()
        target.write_text(CANARY)
    else:
        target.mkdir(parents=True)
        (target / "f").write_text(CANARY)
    err = refused(train_model.main, _train(paths, run), "train-model", "--out", paths["tmp"],
                  capsys)
    assert "--resume" in err and "--overwrite" in err and str(run) in err


def test_train_model_resume_and_overwrite_exclude_each_other(paths, capsys):
    refused(train_model.main, _train(paths, paths["run"], "--resume", "--overwrite"),
            "train-model", "--resume/--overwrite", paths["tmp"], capsys)


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--preset", "nope"], ["--batch", "0"],
                                 ["--device", "cuda"]])
def test_train_model_overwrite_deletes_nothing_before_validation(paths, capsys, bad):
    """--overwrite with a flag that fails validation: the earlier run is still all there."""
    refused(train_model.main, _train(paths, paths["run"], "--overwrite", *bad), "train-model",
            bad[0], paths["tmp"], capsys)


@pytest.mark.parametrize("content", ["file", "hidden", "folder", "link", "study"])
def test_make_phantoms_refuses_a_non_empty_out(paths, capsys, content):
    out = paths["tmp"] / "ph"
    out.mkdir()
    if content == "file":
        (out / "notes.txt").write_text(CANARY)
    elif content == "hidden":
        (out / ".keep").write_text(CANARY)
    elif content == "folder":
        (out / "empty").mkdir()
    elif content == "link":
        (out / "l").symlink_to(paths["file"])
    else:
        _fake_study(out / f"{CANARY}^A_PID1")
    err = refused(make_phantoms.main, ["--out", out, "--patients", "1"], "make-phantoms",
                  "--overwrite", paths["tmp"], capsys)
    assert f"--out {out}: not empty" in err


def _fake_study(folder: Path) -> None:
    (folder / "CT_0").mkdir(parents=True)
    (folder / "CT_0" / "IM-0000-0000.dcm").write_text(CANARY)
    (folder / "CT_0_truth.json").write_text(CANARY)


@pytest.mark.parametrize("foreign", ["notes.txt", "empty", "x/CT_0_truth.json",
                                     "A^C_PID2/notes.txt"])
def test_make_phantoms_overwrite_keeps_what_it_did_not_write(paths, capsys, foreign):
    """--overwrite deletes earlier studies only: anything else in --out stops it, untouched."""
    out = paths["tmp"] / "ph"
    _fake_study(out / "A^B_PID1")
    target = out / foreign
    target.parent.mkdir(parents=True, exist_ok=True)
    if "." in target.name:
        target.write_text(CANARY)
    else:
        target.mkdir()
    err = refused(make_phantoms.main, ["--out", out, "--patients", "1", "--overwrite"],
                  "make-phantoms", "--overwrite", paths["tmp"], capsys)
    assert "did not write" in err


def test_make_phantoms_overwrite_replaces_the_collection(tmp_path):
    """An earlier collection (seed 0, 2 patients, one of them cut short as by a kill) replaced
    by --overwrite (seed 1, 1 patient) is byte-identical to writing seed 1 into a new folder:
    nothing of the old one mixes in."""
    args = ["--patients", "1", "--seed", "1", "--matrix", "32"]
    assert make_phantoms.main(["--out", str(tmp_path / "a"), "--patients", "2", "--matrix",
                               "32"]) == 0
    for sidecar in next((tmp_path / "a").iterdir()).glob("CT_*.*"):  # killed mid-study
        sidecar.unlink()
    assert make_phantoms.main(["--out", str(tmp_path / "a"), *args]) == 2
    assert make_phantoms.main(["--out", str(tmp_path / "a"), *args, "--overwrite"]) == 0
    assert make_phantoms.main(["--out", str(tmp_path / "b"), *args]) == 0
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")


# -- devices and GPUs -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", "mps"])
def test_build_corpus_refuses_a_device_that_is_not_here(paths, capsys, device):
    assert not pconfig.local_gpus()  # this machine has no GPU
    refused(build_corpus.main, _build(paths, "--device", device, "--roi", "labels,boxes"),
            "build-corpus", f"--device {device}", paths["tmp"], capsys)


def test_build_corpus_cuda_without_gpu_exits_at_once_as_a_process(paths):
    """The real process on the Ray executor (which would wait forever for the GPU): exit 2
    before Ray starts. The timeout only trips on a hang."""
    env = {**os.environ, "REGIONCORPUS_EXECUTOR": "ray"}
    proc = subprocess.run([sys.executable, "-m", "workflows.build_corpus",
                           *map(str, _build(paths, "--device", "cuda", "--roi", "labels,boxes",
                                            "--segmenter", "otsu"))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("build-corpus: error: --device cuda")
    assert not (paths["tmp"] / "out").exists()


@pytest.mark.parametrize("argv, flag", [
    (["--device", "cuda:1"], "--device cuda:1"),
    (["--device", "cuda", "--roi", "labels,boxes", "--model-actors", "2"], "--model-actors 2"),
    (["--device", "cpu", "--roi", "labels,boxes", "--gpus-per-actor", "2"], "--gpus-per-actor"),
])
def test_build_corpus_refuses_more_gpus_than_this_machine_has(paths, capsys, argv, flag):
    with mock.patch.object(pconfig, "local_gpus", return_value=1):
        refused(build_corpus.main, _build(paths, "--segmenter", "otsu", "--executor", "ray",
                                          *argv), "build-corpus", flag, paths["tmp"], capsys)


def test_device_auto_resolves_to_what_is_here(paths):
    # a model stage: without one the device is unused and torch is not asked (cpu)
    args = build_corpus._parser().parse_args(list(map(str, _build(paths, "--device", "auto",
                                                                  "--roi", "labels,boxes"))))
    assert build_corpus.config_from_args(args).regions.device == "cpu"
    with mock.patch.object(build_corpus, "local_gpus", return_value=2):
        assert build_corpus.config_from_args(args).regions.device == "cuda"
    cluster = build_corpus._parser().parse_args([*map(str, _build(paths, "--device", "auto")),
                                                 "--address", "auto"])
    assert build_corpus.config_from_args(cluster).regions.device == "auto"  # the cluster's call


def _cfg(device: str, actors: int, per_actor: float, routes: str, executor: str,
         address: str | None) -> BuildConfig:
    return BuildConfig(sources=(ROOT,), out=ROOT / "never-written",
                       regions=RegionConfig(routes=tuple(routes.split(",")), segmenter="otsu",
                                            device=device),
                       execution=ExecConfig(executor=executor, address=address,
                                            model_actors=actors, gpus_per_actor=per_actor))


REQUESTS = dict(device=st.sampled_from(["cpu", "cuda", "auto"]),
                actors=st.integers(1, 6), per_actor=st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]),
                routes=st.sampled_from(["labels", "labels,boxes", "boxes"]),
                gpus=st.integers(0, 8))


def _expected_refusal(device: str, actors: int, per_actor: float, routes: str, executor: str,
                      gpus: int) -> bool:
    """The rule, written independently: cuda needs a GPU; the Ray model stage (boxes route)
    reserves actors x per-actor GPUs (per-actor -1: 1 on cuda, else 0)."""
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    per = per_actor if per_actor >= 0 else (1.0 if device == "cuda" else 0.0)
    need = actors * per if (executor == "ray" and "boxes" in routes) else 0.0
    return (device == "cuda" and gpus == 0) or need > gpus


@settings(max_examples=150, deadline=None)
@given(executor=st.sampled_from(["ray", "local"]), **REQUESTS)
def test_gpu_requests_against_this_machine(device, actors, per_actor, routes, executor, gpus):
    """BuildConfig.validate (no --address) refuses exactly the requests this machine cannot
    meet, naming --device or --model-actors/--gpus-per-actor."""
    with mock.patch.object(pconfig, "local_gpus", return_value=gpus):
        cfg = _cfg(device, actors, per_actor, routes, executor, None).resolved(gpus)
        if not _expected_refusal(device, actors, per_actor, routes, executor, gpus):
            cfg.validate()
            return
        with pytest.raises(RequestError) as e:
            cfg.validate()
    assert str(e.value).startswith(("--device", "--model-actors"))


@settings(max_examples=150, deadline=None)
@given(**REQUESTS)
def test_gpu_requests_against_a_cluster(device, actors, per_actor, routes, gpus):
    """With --address the driver's own GPUs do not matter (validate passes on this GPU-less
    machine); check_cluster_gpus, given ray.cluster_resources(), refuses exactly the requests
    that cluster cannot meet, and resolves --device auto against it."""
    cfg = _cfg(device, actors, per_actor, routes, "ray", "ray://head:10001")
    cfg.validate()
    resources = {"CPU": 64.0, "GPU": float(gpus)} if gpus else {"CPU": 64.0}
    if _expected_refusal(device, actors, per_actor, routes, "ray", gpus):
        with pytest.raises(RequestError, match="--address ray://head:10001"):
            check_cluster_gpus(cfg, resources)
        return
    resolved = check_cluster_gpus(cfg, resources)
    if device == "auto":
        assert resolved.regions.device == ("cuda" if gpus else "cpu")


def test_device_auto_unresolved_is_refused_without_a_cluster():
    with pytest.raises(ValueError, match="--device auto"):
        _cfg("auto", 1, -1.0, "labels", "local", None).validate()


@pytest.mark.parametrize("argv, flag", [
    (["--device", "cuda"], "--device cuda"),
    (["--device", "cuda:1"], "--device cuda:1"),
    (["--device", "cuda", "--address", "local"], "--device cuda"),
])
def test_train_model_refuses_a_device_that_is_not_here(paths, capsys, argv, flag):
    refused(train_model.main, _train(paths, None, *argv), "train-model", flag, paths["tmp"],
            capsys)


def test_evaluate_model_refuses_a_device_that_is_not_here(paths, capsys):
    refused(evaluate_model.main, ["--corpus", paths["corpus"], "--run", paths["run"], "--out",
                                  paths["tmp"] / "r.json", "--device", "cuda"],
            "evaluate-model", "--device cuda", paths["tmp"], capsys)


def test_train_model_on_a_cluster_without_enough_gpus():
    from model.ray_train import ClusterRequestError, RayOptions, check_cluster_gpus

    opts = RayOptions(address="auto", workers=4)
    check_cluster_gpus(opts, "cuda", {"GPU": 4.0})
    check_cluster_gpus(opts, "cpu", {})
    with pytest.raises(ClusterRequestError, match="--ray-workers 4"):
        check_cluster_gpus(opts, "cuda", {"GPU": 3.0})


# -- weights and names ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["sam:{missing}", "medsam:{missing}", "sam:{folder}",
                                  "sam:{dangling}", "sam-vit_b:{missing}", "sam",
                                  "sam-vit_q:{file}", "otsu:{file}", "lite-medsam:{file}",
                                  "nope", "sam2:{file}"])
def test_build_corpus_refuses_a_segmenter_it_cannot_load(paths, capsys, spec):
    spec = spec.format(**{k: str(v) for k, v in paths.items()})
    err = refused(build_corpus.main, _build(paths, "--roi", "labels,boxes", "--segmenter", spec),
                  "build-corpus", f"--segmenter {spec}", paths["tmp"], capsys)
    if spec in ("nope", f"sam2:{paths['file']}"):  # an unknown name lists the known ones
        assert all(name in err for name in ("lite-medsam", "sam:PATH", "medsam:PATH", "otsu"))


@pytest.mark.parametrize("what", ["missing", "folder", "dangling"])
def test_build_corpus_refuses_detector_weights_it_cannot_read(paths, capsys, what):
    refused(build_corpus.main, _build(paths, "--roi", "labels,detector", "--detector",
                                      paths[what]), "build-corpus", f"--detector {paths[what]}",
            paths["tmp"], capsys)


@pytest.mark.parametrize("flag, what", [("--image-weights", "missing"),
                                        ("--image-weights", "folder"),
                                        ("--image-weights", "dangling"),
                                        ("--text-weights", "missing"),
                                        ("--text-weights", "file"),
                                        ("--text-weights", "folder")])  # no config.json
def test_train_model_refuses_weights_it_cannot_read(paths, capsys, flag, what):
    refused(train_model.main, _train(paths, None, flag, paths[what]), "train-model",
            f"{flag} {paths[what]}", paths["tmp"], capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_weights_are_refused(paths, capsys):
    paths["file"].chmod(0)
    refused(train_model.main, _train(paths, None, "--image-weights", paths["file"]),
            "train-model", "--image-weights", paths["tmp"], capsys)
    refused(build_corpus.main, _build(paths, "--roi", "labels,boxes", "--segmenter",
                                      f"sam:{paths['file']}"),
            "build-corpus", "--segmenter", paths["tmp"], capsys)


# -- a corpus without test patients ---------------------------------------------------------------

@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> dict[str, Path]:
    """A 2-patient corpus built with --split 1,0,0 (no val or test patients) and a 2-step run
    trained on it."""
    from model.train import TrainOptions, train
    from pipeline.phantoms.studies import make_phantoms

    root = tmp_path_factory.mktemp("train_only")
    make_phantoms(root / "ph", patients=2, seed=0, matrix=64)
    assert build_corpus.main([str(root / "ph"), "--out", str(root / "corpus"), "--every-k", "0",
                              "--executor", "local", "--split", "1,0,0"]) == 0
    preset = root / "micro.json"
    preset.write_text(json.dumps({
        "image": {"image_size": 64, "patch_size": 16, "width": 32, "depth": 1, "heads": 2},
        "text": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64, "max_len": 32,
                 "vocab_size": 300},
        "roi": {"roi_size": 32, "layers": 1}, "model": {"embed_dim": 16},
        "data": {"batch": 4, "workers": 0, "shuffle_buffer": 8},
        "train": {"stage_steps": [1, 1, 1], "warmup_steps": 1, "log_every": 1}}))
    train(TrainOptions(corpus=root / "corpus", out=root / "run", preset=str(preset), steps=2))
    return {"root": root, "corpus": root / "corpus", "run": root / "run"}


@pytest.mark.parametrize("split", ["test", "val"])
def test_evaluate_model_on_a_split_without_patients(train_only, capsys, split):
    """No KeyError: one line naming --split, exit 2, no report written."""
    out = train_only["root"] / "report.json"
    err = refused(evaluate_model.main, ["--corpus", train_only["corpus"], "--run",
                                        train_only["run"], "--out", out, "--split", split],
                  "evaluate-model", f"--split {split}", train_only["root"], capsys)
    assert "nothing to evaluate" in err and not out.exists()


@pytest.mark.parametrize("extra", [[], ["--near-duplicates"], ["--verify-captions"],
                                   ["--near-duplicates", "--verify-captions", "--limit", "3"]])
def test_browse_catalog_json_is_one_document(train_only, capsys, extra):
    """--check-leakage --json (with any other check): stdout parses as ONE JSON document that
    holds the summary, the sample and each check's result."""
    capsys.readouterr()
    status = browse_catalog.main([str(train_only["corpus"]), "--check-leakage", "--json",
                                  *extra])
    out = capsys.readouterr().out
    doc = json.loads(out)  # raises on a second document or any table text
    assert status == 0
    assert doc["leakage"]["ok"] is True and doc["rows"]["regions"] > 0
    assert len(doc["sample"]) == (3 if "--limit" in extra else 10)
    assert ("near_duplicates" in doc) == ("--near-duplicates" in extra)
    assert ("caption_check" in doc) == ("--verify-captions" in extra)


def test_train_model_on_a_corpus_without_train_images(tmp_path, capsys):
    """A corpus whose patients all went to val/test: refused before any work (the loader would
    wait forever for a first batch)."""
    from pipeline.phantoms.studies import make_phantoms

    make_phantoms(tmp_path / "ph", patients=2, seed=0, matrix=64)
    assert build_corpus.main([str(tmp_path / "ph"), "--out", str(tmp_path / "corpus"),
                              "--every-k", "0", "--executor", "local", "--split", "0,0.5,0.5"]) == 0
    err = refused(train_model.main, ["--corpus", tmp_path / "corpus", "--out", tmp_path / "run",
                                     "--preset", "tiny", "--steps", "2"],
                  "train-model", "--corpus", tmp_path, capsys)
    assert "no images in the train split" in err and not (tmp_path / "run").exists()
