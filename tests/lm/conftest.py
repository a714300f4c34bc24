"""Shared fixtures of the LM tests: a private cache folder and the tiny shakespeare path (skip when
absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.datadir import data_dir


@pytest.fixture(autouse=True)
def _lm_cache(tmp_path_factory, monkeypatch):
    # one cache per test session: tokenised corpora are reused across tests, never written beside the data
    root = tmp_path_factory.getbasetemp() / "lm_cache"
    monkeypatch.setenv("MOEKIT_CACHE", str(root))


@pytest.fixture
def shakespeare_path() -> Path:
    p = data_dir() / "tinyshakespeare" / "input.txt"
    if not p.is_file():
        pytest.skip(f"tiny shakespeare not found at {p} (set MOEKIT_DATA)")
    return p
