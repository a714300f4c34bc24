"""Suite-wide rules for tests that need a real data set or a PostgreSQL server.

A test that needs data says so with the marker ``@pytest.mark.needs_data("tinyshakespeare/input.txt", ...)``
(paths relative to the data folder, ``$MOEKIT_DATA`` or ``../shared/datasets``) or, inside a fixture, calls
the ``require_data`` fixture's function. PostgreSQL fixtures call ``require_postgres``.

Where the resource is missing the test is skipped, saying what is missing, unless
``MOEKIT_REQUIRE_DATA=1`` (resp. ``MOEKIT_REQUIRE_POSTGRES=1``) is set: then it fails. CI (``.ci/run``) sets
both, so a CI run can never be green with the real-data or shared-store tests silently skipped. The terminal
summary ends with one line counting the skips of each kind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from apps.datadir import data_dir

_SKIPS: dict[str, int] = {"data": 0, "postgres": 0}
_ENV = {"data": "MOEKIT_REQUIRE_DATA", "postgres": "MOEKIT_REQUIRE_POSTGRES"}
_TAG = "[moekit-missing-{kind}] "


def missing(kind: str, reason: str) -> NoReturn:
    """Skip (or, under ``MOEKIT_REQUIRE_<KIND>=1``, fail) because ``kind`` ("data"/"postgres") is missing."""
    env = _ENV[kind]
    if os.environ.get(env) == "1":
        pytest.fail(f"{reason} ({env}=1: a missing {kind} resource is a failure)", pytrace=False)
    pytest.skip(_TAG.format(kind=kind) + reason)


def require_data_paths(*relpaths: str) -> Path:
    """The data folder, after checking that every ``relpath`` exists in it (else :func:`missing`)."""
    root = data_dir()
    for rel in relpaths:
        if not (root / rel).exists():
            missing("data", f"data set file {root / rel} not found (set MOEKIT_DATA to the data folder)")
    return root


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_data(*relpaths): the test reads these paths under the data folder (skip or fail)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_data"):
        require_data_paths(*mark.args)


@pytest.fixture(scope="session")
def require_data() -> Callable[..., Path]:
    """``require_data("tinyshakespeare/input.txt", ...) -> data folder``; skips/fails on an absent path."""
    return require_data_paths


@pytest.fixture(scope="session")
def require_postgres() -> Callable[[str], NoReturn]:
    """``require_postgres(reason)``: skip, or fail under ``MOEKIT_REQUIRE_POSTGRES=1`` (no server)."""
    return lambda reason: missing("postgres", reason)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        for kind in _SKIPS:
            if _TAG.format(kind=kind) in str(report.longrepr[2]):
                _SKIPS[kind] += 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    parts = [f"{n} for missing {kind} ({_ENV[kind]}={os.environ.get(_ENV[kind], '0')})" for kind, n in
             _SKIPS.items()]
    terminalreporter.write_line("moekit skip summary: " + "; ".join(parts))
