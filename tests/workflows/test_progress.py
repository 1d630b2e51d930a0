"""Progress: a live bar (carriage returns, rate, ETA) on a terminal, plain lines elsewhere;
build-corpus and train-model run under a pseudo-terminal and without one; the loss plot breaks
lines where a term is not computed."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from model.trainlog import TrainLog, loss_series, plot_losses
from pipeline.run import progress
from pipeline.run.progress import Bar, CommitCounter
from pipeline.write import commit_shard
from tests.model.conftest import MICRO as MODEL_MICRO

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key-not-secret-0123456789"
# tqdm's meter: "12/40 [00:03<00:07, 3.10 series/s" (or "2.5 s/series" when slower than 1/s)
LIVE = re.compile(r"\d+/\d+ \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ ?(s/)?[\w/]+")
# the model tests' micro preset, trained for 30 steps (10 per stage) with a loss logged each step
MICRO = {**MODEL_MICRO, "data": {**MODEL_MICRO["data"], "regions_per_image": 2},
         "train": {"stage_steps": [10, 10, 10], "lr": 2e-3, "warmup_steps": 2, "log_every": 1,
                   "ckpt_every": 30}}


class Clock:
    """A stand-in for ``time.monotonic`` that moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


def test_plain_lines_are_throttled_and_end_with_the_final_one(clock):
    out = io.StringIO()
    bar = Bar("series", 10, "series", stream=out, mode="plain", every_s=5.0, t0=clock.now)
    for done in range(1, 11):
        clock.now += 1.0  # one series a second: a line at most every 5 s, then the last
        bar.update(done, images=done * 3)
    bar.close()
    slow = Bar("detector", 100, "epoch", stream=out, mode="plain", t0=clock.now)
    clock.now += 30.0
    slow.update(1)
    lines = out.getvalue().splitlines()
    assert lines.pop() == "[detector] 1/100 (30.0 s/epoch, eta 49:30)"
    assert "\r" not in out.getvalue()
    assert lines == ["[series] 1/10 (1.0/s, eta 9 s) images=3",
                     "[series] 6/10 (1.0/s, eta 4 s) images=18",
                     "[series] 10/10 (1.0/s, eta 0 s) images=30"]


def test_live_bar_redraws_in_place_with_rate_and_eta(clock):
    out = io.StringIO()
    bar = Bar("train", 20, "step", stream=out, mode="bar", t0=clock.now)
    bar._tqdm.mininterval = 0  # every update redraws (tqdm's own clock is left alone)
    for done in range(1, 11):
        bar.update(done, loss=1.0 / done)
    text = out.getvalue()
    bar.close()
    assert text.count("\r") >= 3 and "\n" not in text  # one line, redrawn
    assert LIVE.search(text) and "loss=0.1" in text


def test_report_makes_and_closes_one_bar_per_stage(monkeypatch):
    out = io.StringIO()
    monkeypatch.setenv(progress.MODE_ENV, "plain")
    progress.count_beside(("series",), lambda: {"regions": 7})
    try:
        for done in (1, 2):
            progress.report("series", done, 2, 0.0, stream=out)
        progress.report("headers", 5, 5, 0.0, stream=out)
    finally:
        progress.count_beside(("series",), None)
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["[series]", "[series]", "[headers]"]
    assert lines[1].startswith("[series] 2/2") and lines[1].endswith("regions=7")
    assert "regions" not in lines[2] and progress._bars == {}


def test_commit_counter_sums_new_markers_and_replaced_ones_once(tmp_path):
    out = tmp_path / "corpus"
    commit_shard(out, "shard-00000", {"images": [], "regions": []})
    counter = CommitCounter(out, every_s=0.0)
    os.utime(out / "_commits" / "shard-00000.json", (0, 0))  # committed before this run
    assert counter() == {"images": 0, "regions": 0}
    marker = {"shard": "shard-00001", "tables": {"images": {"rows": 3}, "regions": {"rows": 5}}}
    (out / "_commits" / "shard-00001.json").write_text(json.dumps(marker))
    assert counter() == {"images": 3, "regions": 5}
    assert counter() == {"images": 3, "regions": 5}  # read once
    marker["tables"]["regions"]["rows"] = 9  # a rebuilt shard replaces its marker
    path = out / "_commits" / "shard-00001.json"
    path.write_text(json.dumps(marker))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert counter() == {"images": 3, "regions": 9}


def test_loss_series_breaks_where_a_term_is_absent_and_keeps_val_apart(tmp_path):
    rows = [{"step": 1, "stage": 1, "global_loss": 2.0}, {"step": 2, "stage": 2, "region_loss": 1.0},
            {"step": 2, "stage": 2, "split": "val", "global_loss": 2.5, "region_loss": 1.5},
            {"step": 3, "stage": 3, "global_loss": 1.5, "region_loss": 0.8}]
    steps, vals = loss_series(rows, "global_loss", "train")
    assert steps == [1, 2, 3] and vals[0] == 2.0 and math.isnan(vals[1]) and vals[2] == 1.5
    assert loss_series(rows, "region_loss", "train") == ([2, 3], [1.0, 0.8])
    assert loss_series(rows, "global_loss", "val") == ([2], [2.5])
    plot_losses(rows, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_trainlog_bar_summary_and_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(progress.MODE_ENV, "plain")
    log = TrainLog(tmp_path, 0)
    for step in (1, 2):
        log.tick(step, 2)
        log.write(step, 1, {"global_loss": 1.0 / step}, {}, lr=1e-3, samples_per_s=8.0)
    log.write(2, 1, {"global_loss": 0.9}, {}, split="val", zero_shot_region_acc=0.25)
    log.close()
    err = capsys.readouterr().err
    assert "[train] 2/2" in err and "loss=0.5" in err and "\r" not in err
    assert "last validation (step 2): loss 0.900, zero-shot region accuracy 0.250" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["last"]["loss"] == 0.5
    assert summary["last_val"]["split"] == "val"


def test_trainlog_bar_moves_with_every_step_between_log_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(progress.MODE_ENV, "bar")
    log = TrainLog(tmp_path, 0)
    for step in (1, 2, 3):  # no log row yet: only the per-step ticks move the bar
        log.tick(step, 10)
    log.bar._tqdm.refresh()
    assert "3/10 [" in capsys.readouterr().err.split("\r")[-1]
    log.close()


# -- the commands, under a pseudo-terminal and without one ------------------------------------

def run_in_pty(argv: list[str], env: dict, cols: int = 160) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; (exit status, all output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env,
                            cwd=ROOT, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError as e:  # EIO: the child side closed
            if e.errno != errno.EIO:
                raise
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


def run_piped(argv: list[str], env: dict) -> tuple[int, str, str]:
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != progress.MODE_ENV}
    env.update(REGIONCORPUS_KEY=KEY, OMP_NUM_THREADS="1", TERM="xterm")
    return env


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from pipeline.phantoms.studies import make_phantoms

    root = tmp_path_factory.mktemp("progress_phantoms")
    make_phantoms(root, patients=3, seed=0)
    return root


def build_argv(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "workflows.build_corpus", str(src), "--out", str(out),
            "--every-k", "0", "--executor", "local", "--workers", "1", "--units-per-shard", "1"]


def train_argv(corpus: Path, out: Path, preset: Path) -> list[str]:
    return [sys.executable, "-m", "workflows.train_model", "--corpus", str(corpus), "--out",
            str(out), "--preset", str(preset), "--device", "cpu"]


def test_build_and_train_show_a_live_bar_on_a_terminal(phantoms, tmp_path, cli_env):
    rc, text = run_in_pty(build_argv(phantoms, tmp_path / "corpus"), cli_env)
    assert rc == 0, text[-2000:]
    live = [seg for seg in text.split("\r") if seg.startswith("series:")]
    assert live and LIVE.search(live[-1]) and "images=" in live[-1] and "regions=" in live[-1]
    assert re.search(r"\d+ series -> \d+ images, \d+ regions", text)  # the human summary
    assert json.loads((tmp_path / "corpus" / "build_summary.json").read_text())["rows"]["images"]

    preset = tmp_path / "micro.json"
    preset.write_text(json.dumps(MICRO))
    rc, text = run_in_pty(train_argv(tmp_path / "corpus", tmp_path / "run", preset), cli_env)
    assert rc == 0, text[-2000:]
    steps = [seg for seg in text.split("\r") if seg.startswith("train:")]
    assert len(steps) >= 3 and LIVE.search(steps[-1])
    losses = {m for seg in steps for m in re.findall(r"loss=([\d.e+-]+)", seg)}
    assert len(losses) >= 2  # the loss moves with the steps
    assert all(k in steps[-1] for k in ("lr=", "samples/s="))
    assert (tmp_path / "run" / "summary.json").is_file()


def test_build_and_train_print_plain_lines_without_a_terminal(phantoms, tmp_path, cli_env):
    rc, out, err = run_piped([*build_argv(phantoms, tmp_path / "corpus"), "--json"], cli_env)
    assert rc == 0, err[-2000:]
    assert "\r" not in out + err
    assert re.search(r"^\[series\] 3/3 \([\d.]+ ?(/s|s/series), eta 0 s\) images=\d+ regions=\d+$", err,
                     re.MULTILINE)
    # --json: the summary document on stdout, the same as the file
    assert json.loads(out) == json.loads((tmp_path / "corpus" / "build_summary.json").read_text())
    preset = tmp_path / "micro.json"
    preset.write_text(json.dumps(MICRO))
    rc, out, err = run_piped(train_argv(tmp_path / "corpus", tmp_path / "run", preset), cli_env)
    assert rc == 0, err[-2000:]
    assert "\r" not in out + err
    assert re.search(r"^\[train\] 30/30 \(.*\) loss=[\d.]+ lr=\S+ samples/s=\S+$", err,
                     re.MULTILINE)


RAY_NOISE = """
import logging, warnings
from pipeline.run.progress import quiet_ray
quiet_ray()
import ray  # noqa: F401
from ray.util.annotations import RayDeprecationWarning
logging.getLogger("ray").setLevel(logging.INFO)  # what ray.init does to its root logger
for name in ("ray._private.worker", "ray.data._internal.execution.streaming_executor"):
    logging.getLogger(name).info("NOISE-INFO")
    logging.getLogger(name).warning("NOISE-WARNING")
    logging.getLogger(name).error("REAL-ERROR")
warnings.warn("NOISE-DEPRECATED", RayDeprecationWarning)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_noise_is_off_unless_verbose(cli_env, verbose):
    env = {k: v for k, v in cli_env.items() if k != progress.VERBOSE_ENV}
    if verbose:
        env[progress.VERBOSE_ENV] = "1"
    rc, out, err = run_piped([sys.executable, "-c", RAY_NOISE], env)
    assert rc == 0, err[-2000:]
    assert err.count("REAL-ERROR") == 2  # errors always show
    for noise in ("NOISE-INFO", "NOISE-WARNING", "NOISE-DEPRECATED"):
        assert (noise in err) is verbose, noise
