"""What a long run shows while it works: one progress bar per stage, and Ray kept quiet.

On a terminal (stderr is a TTY) each stage gets a live tqdm bar, redrawn in place: count,
rate, ETA and the stage's running counts (images and regions committed, a training step's
loss)::

    series:  40%|████      | 16/40 [00:05<00:07, 3.1 series/s, images=212, regions=847]

Elsewhere (CI, a log file, a pipe) the same facts go out as plain lines, one every
:data:`PLAIN_EVERY_S` seconds at most plus the final one, and never a carriage return::

    [series] 16/40 (3.1/s, eta 7 s) images=212 regions=847

``$REGIONCORPUS_PROGRESS`` (``bar``, ``plain`` or ``off``) overrides the choice.

Ray's own output (its log lines, Ray Data's notices, deprecation warnings) is switched off on
the driver by :func:`quiet_ray` unless ``$REGIONCORPUS_VERBOSE`` is set (``build-corpus
--verbose`` sets it); errors still show.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from pipeline.storage import is_remote

PLAIN_EVERY_S = 5.0  # plain mode: at most one line per stage this often (and the final one)
BAR_EVERY_S = 0.2  # bar mode: redraws at most this often (tqdm's mininterval)
MODES = ("bar", "plain", "off")
VERBOSE_ENV = "REGIONCORPUS_VERBOSE"
MODE_ENV = "REGIONCORPUS_PROGRESS"


def output_mode(stream: TextIO) -> str:
    """``bar`` when ``stream`` is a terminal, else ``plain``; ``$REGIONCORPUS_PROGRESS`` wins."""
    forced = os.environ.get(MODE_ENV, "")
    if forced in MODES:
        return forced
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # a closed or file-like stream without a descriptor
        return "plain"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


class Bar:
    """The progress of one stage: ``update(done, **counts)`` as work completes, then
    ``close()``. ``total`` is the count at which the stage is done; ``t0`` (``time.monotonic``)
    is when the stage started (default: now), so the rate counts work done before the first
    update."""

    def __init__(self, stage: str, total: int, unit: str = "it", *, t0: float | None = None,
                 stream: TextIO | None = None, mode: str | None = None,
                 every_s: float = PLAIN_EVERY_S, initial: int = 0):
        self.stage, self.total, self.unit = stage, int(total), unit
        self.stream = stream if stream is not None else sys.stderr
        self.mode = mode or output_mode(self.stream)
        self.t0 = time.monotonic() if t0 is None else t0
        self.every_s, self.done, self.initial, self.counts = every_s, initial, initial, {}
        self._last = -math.inf
        self._tqdm, self._closed = None, False
        if self.mode == "bar":
            from tqdm import tqdm

            self._tqdm = tqdm(total=self.total, initial=initial, desc=stage, unit=unit,
                              file=self.stream, dynamic_ncols=True, mininterval=BAR_EVERY_S,
                              smoothing=0.1, leave=True)
            self._tqdm.start_t -= time.monotonic() - self.t0  # tqdm's clock, our start

    def update(self, done: int, total: int | None = None, **counts) -> None:
        """Work done so far (not an increment) and the counts to show beside it; ``total``
        when the amount of work was re-estimated (a time-limited training run)."""
        if total is not None and total != self.total:
            self.total = int(total)
            if self._tqdm is not None:
                self._tqdm.total = self.total
        done = min(int(done), self.total) if self.total else int(done)
        self.counts.update(counts)
        if self._tqdm is not None:
            self._tqdm.set_postfix({k: _fmt(v) for k, v in self.counts.items()}, refresh=False)
            self._tqdm.update(done - self._tqdm.n)
        elif self.mode == "plain" and done != self.done and done < self.total:
            now = time.monotonic()
            if now - self._last >= self.every_s:  # the final line comes from close()
                self._last = now
                self._print(self.line(done, now))
        self.done = done

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, done: int, now: float) -> str:
        """The plain-mode line: ``[stage] done/total (R/s or S s/unit, eta T) k=v ...``, with
        T in seconds below a minute, else ``[h:]mm:ss`` as tqdm writes it."""
        from tqdm import tqdm

        rate = (done - self.initial) / max(1e-9, now - self.t0)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        speed = f"{1 / rate:.1f} s/{self.unit}" if 0 < rate < 1 else f"{rate:.1f}/s"
        left = f"{eta:.0f} s" if eta < 59.5 else tqdm.format_interval(eta)
        extra = "".join(f" {k}={_fmt(v)}" for k, v in self.counts.items())
        return f"[{self.stage}] {done}/{self.total} ({speed}, eta {left}){extra}"

    def close(self) -> None:
        """The final state: the bar's last redraw, or the final plain line."""
        if self._tqdm is not None:
            self._tqdm.refresh()
            self._tqdm.close()
            self._tqdm = None
        elif self.mode == "plain" and not self._closed:
            self._print(self.line(self.done, time.monotonic()))
        self._closed = True

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_bars: dict[str, Bar] = {}
_counters: dict[str, Callable[[], dict]] = {}


def count_beside(stages: tuple[str, ...], counter: Callable[[], dict] | None) -> None:
    """Show ``counter()`` (a dict of counts) beside the bars of ``stages``; None removes it."""
    for s in stages:
        if counter is None:
            _counters.pop(s, None)
        else:
            _counters[s] = counter


def report(stage: str, done: int, total: int, t0: float, unit: str | None = None,
           stream: TextIO | None = None) -> None:
    """Stage-level progress for code that only knows counts (the build's executors): the
    stage's bar (on ``stream``, default stderr) is made on the first call (again when
    ``total`` changes or ``done`` goes back) and closed when ``done`` reaches ``total``."""
    bar = _bars.get(stage)
    if bar is None or bar.total != total or done < bar.done:
        if bar is not None:
            bar.close()
        bar = _bars[stage] = Bar(stage, total, unit or stage, t0=t0, stream=stream)
    counter = _counters.get(stage)
    bar.update(done, **(counter() if counter else {}))
    if done >= total:
        bar.close()
        _bars.pop(stage, None)


class CommitCounter:
    """Rows of ``tables`` committed to the corpus ``out`` since this object was made, summed
    from the commit markers (``out/_commits/*.json``) written since then, for display while a
    build runs (the manifest holds the real counts once it ends). The folder is listed at most
    every ``every_s`` seconds; a marker is read again only when it is replaced."""

    def __init__(self, out: Path, tables: tuple[str, ...] = ("images", "regions"),
                 every_s: float = 1.0):
        self.local = not is_remote(out)  # on an object store nothing is counted
        self.dir, self.tables, self.every_s = Path(str(out)) / "_commits", tables, every_s
        self.start = time.time()
        self.seen: dict[str, tuple[int, dict]] = {}  # marker name → (mtime_ns, rows counted)
        self.counts = dict.fromkeys(tables, 0)
        self._last = -math.inf

    def __call__(self) -> dict[str, int]:
        now = time.monotonic()
        if not self.local:
            return {}
        if now - self._last < self.every_s:
            return dict(self.counts)
        self._last = now
        for path in self.dir.glob("*.json") if self.dir.is_dir() else ():
            try:
                st = path.stat()
                if st.st_mtime < self.start or self.seen.get(path.name, (0,))[0] == st.st_mtime_ns:
                    continue
                tables = json.loads(path.read_text()).get("tables", {})
            except (OSError, ValueError):  # replaced while read: counted next time
                continue
            rows = {t: int(tables.get(t, {}).get("rows", 0)) for t in self.tables}
            old = self.seen.get(path.name, (0, dict.fromkeys(self.tables, 0)))[1]
            for t in self.tables:
                self.counts[t] += rows[t] - old[t]
            self.seen[path.name] = (st.st_mtime_ns, rows)
        return dict(self.counts)


def verbose() -> bool:
    """True when the libraries' own output was asked for (``$REGIONCORPUS_VERBOSE``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


# Ray's module loggers, quieted below their own parents: ``ray.init`` resets the level of the
# "ray" logger itself, never these.
RAY_LOGGERS = ("ray._private", "ray._common", "ray.data", "ray.util", "ray.air", "ray.train",
               "ray.tune", "ray.autoscaler", "ray.dashboard", "ray.runtime_env", "ray.serve")


def quiet_ray() -> None:
    """Unless :func:`verbose`: Ray's log lines below ERROR and its Python warnings off on this
    process (Ray must be importable; it is imported here so that Ray Data's own logging setup,
    done at import, comes first). Called by the driver before ``ray.init``."""
    if verbose():
        return
    import ray
    import ray.data  # noqa: F401  (configures its loggers at import)

    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    from ray.util.annotations import RayDeprecationWarning

    warnings.filterwarnings("ignore", module=r"ray(\..*)?")
    warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    del ray
