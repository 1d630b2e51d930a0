#!/usr/bin/env bash
# bash workflows/test.sh [pytest args...]
# Sets up .venv (workflows/setup.sh), lints with ruff, runs the default test suite (slow tests
# excluded; run them with `bash workflows/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash workflows/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
