"""Shared fixtures of the LM tests: a private cache folder and the tiny shakespeare path (skipped when
absent, a failure under MOEKIT_REQUIRE_DATA=1)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _lm_cache(tmp_path_factory, monkeypatch):
    # one cache per test session: tokenised corpora are reused across tests, never written beside the data
    root = tmp_path_factory.getbasetemp() / "lm_cache"
    monkeypatch.setenv("MOEKIT_CACHE", str(root))


@pytest.fixture
def shakespeare_path(require_data) -> Path:
    return require_data("tinyshakespeare/input.txt") / "tinyshakespeare" / "input.txt"
