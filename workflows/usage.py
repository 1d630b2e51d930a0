"""The entry points' shared edge: parse flags into a validated config and run it, or exit 2
saying why.

Every console command's ``main(argv)`` is one call::

    return run_command(_parser(), config_from_args, work, argv)

``config_from_args`` maps the argparse namespace to a typed config (the only code that sees
the namespace) and raises ``ValueError`` naming the flag and the bad value; a config with a
``validate()`` method is validated too, all before any work. ``work(config)`` does the work and
returns the exit status; a flag that turns out wrong only once work has started (e.g. once a
corpus is read) raises :class:`UsageError`. Either way the command prints one line,
``PROG: error: MESSAGE``, to stderr and returns 2: the format and status argparse itself uses
for unknown flags and unparsable values (those exit through ``SystemExit(2)``). Messages name
the flag and may name a path the user typed, never anything read from a file.

Every command builds its parser with :func:`command_parser`: ``--help`` shows each flag's
default and one example, ``--version`` prints ``PROG regioncorpus X.Y.Z``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

USAGE_STATUS = 2  # argparse's status for a usage error


class UsageError(ValueError):
    """A flag whose value turns out wrong only once work has started (exit status 2)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
    """argparse's help with ``(default: X)`` after each flag that has a default, and the
    description and epilog printed as written (examples keep their line breaks). Flags whose
    default is unset (None, False, an empty list or string) or whose help already names it show none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        unset = default is None or default is False or default in ([], "")
        if unset or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def package_version() -> str:
    """The installed regioncorpus version (``unknown`` when run from an uninstalled tree)."""
    try:
        return importlib.metadata.version("regioncorpus")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def command_parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for the console command ``prog``: :class:`HelpFormatter`, an
    epilog with ``example`` (one command line, starting with ``prog``) and ``--version``."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                epilog=f"example:\n  {example}", formatter_class=HelpFormatter)
    p.add_argument("--version", action="version",
                   version=f"%(prog)s regioncorpus {package_version()}")
    return p


def usage_error(prog: str, err: Exception) -> int:
    """Print ``PROG: error: MESSAGE`` as one line of stderr and return exit status 2."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    print(f"{prog}: error: {'; '.join(lines) or type(err).__name__}", file=sys.stderr)
    return USAGE_STATUS


def check_torch_device(value: str, flag: str = "--device") -> None:
    """Raise ValueError naming ``flag`` unless ``value`` names a torch device (checked by
    spelling, before torch loads): cpu, cuda, cuda:N or mps."""
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
        raise ValueError(f"{flag} {value}: expected cpu, cuda, cuda:N or mps")


def check_device_here(value: str, flag: str = "--device") -> None:
    """:func:`check_torch_device`, then that the device exists on this machine: ``cuda`` needs
    a CUDA device, ``cuda:N`` more than N of them, ``mps`` Metal (ValueError naming ``flag``,
    before any work: a missing GPU otherwise fails late in a traceback, or Ray waits for it)."""
    check_torch_device(value, flag)
    if value != "cpu":
        from pipeline.config import check_local_device

        check_local_device(value, flag)


def validated_config(parser: argparse.ArgumentParser,
                     to_config: Callable[[argparse.Namespace], Any],
                     argv: list[str] | None) -> tuple[Any, int | None]:
    """``(config, None)`` from ``argv`` through ``to_config`` and the config's ``validate()``
    (if it has one); ``(None, 2)`` after a usage error, printed under ``parser.prog``."""
    args = parser.parse_args(argv)
    try:
        cfg = to_config(args)
        validate = getattr(cfg, "validate", None)
        if callable(validate):
            validate()
    except ValueError as e:
        return None, usage_error(parser.prog, e)
    return cfg, None


def run_command(parser: argparse.ArgumentParser,
                to_config: Callable[[argparse.Namespace], Any],
                work: Callable[[Any], int],
                argv: list[str] | None) -> int:
    """Parse and validate ``argv`` (see :func:`validated_config`), set up INFO logging, then
    return ``work(config)``; a :class:`UsageError` from the work is reported like a bad flag."""
    cfg, status = validated_config(parser, to_config, argv)
    if status is not None:
        return status
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return work(cfg)
    except UsageError as e:
        return usage_error(parser.prog, e)


def corpus_location(text: str):
    """argparse type of ``--corpus``: a folder (Path) or an ``s3://`` / ``gs://`` prefix (str)."""
    from pipeline import storage

    try:
        return storage.location(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def corpus_has_manifest(corpus) -> bool:
    """Whether ``corpus`` (folder or object-store prefix) holds a build-corpus manifest."""
    from pipeline import storage

    return storage.is_file(storage.join(corpus, "manifest.json"))
