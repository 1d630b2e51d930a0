"""The entry points' shared start: parse flags into a validated config, or exit 2 saying why."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any


def usage_error(prog: str, err: Exception) -> int:
    """Print ``PROG: error: ...`` (the message names the flag) and return exit status 2."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


def validated_config(prog: str, parser: argparse.ArgumentParser,
                     to_config: Callable[[argparse.Namespace], Any],
                     argv: list[str] | None) -> tuple[Any, int | None]:
    """(config, None) from ``argv`` through ``to_config`` and the config's ``validate()``;
    (None, 2) after a usage error. Also sets up INFO logging for the run."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parser.parse_args(argv)
    try:
        cfg = to_config(args)
        cfg.validate()
    except ValueError as e:
        return None, usage_error(prog, e)
    return cfg, None
