#!/usr/bin/env bash
# bash workflows/setup.sh
# Creates .venv beside the repository and installs the project with its dev extras.
# Idempotent: skips pip when pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
STAMP=".venv/.regioncorpus-installed"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  # torch/torchvision are pinned by range in pyproject.toml; pip takes the wheels on local disk.
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  echo "$WANT" > "$STAMP"
fi
# Headless Chromium for the gallery test (tests/catalogs): Debian packages, only when missing.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
    || echo "setup: could not install chromium (the gallery browser test will be skipped)" >&2
fi
echo "environment ready: $(.venv/bin/python -c 'import torch, pydicom; print("torch", torch.__version__, "pydicom", pydicom.__version__)')"
