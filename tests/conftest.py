"""Shared fixtures and test-wide settings (builders live in tests/factories.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("REGIONCORPUS_KEY", "test-key-not-secret-0123456789")
# Tests run builds in-process (fast start); the Ray executor has its own tests (test_execute.py).
os.environ.setdefault("REGIONCORPUS_EXECUTOR", "local")


@pytest.fixture
def deid():
    from pipeline.ingest.deid import Deidentifier

    return Deidentifier(b"test-key-not-secret-0123456789")
