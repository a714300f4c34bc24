"""Where data sets and caches live, and checksum verification shared by the app loaders.

Data directory: an explicit argument, else ``$MOEKIT_DATA``, else ``../shared/datasets`` beside the repo.
Cache directory: ``$MOEKIT_CACHE``, else ``<repo>/.cache`` (git-ignored). The data directory is treated as
read-only: nothing is ever written beside the data sets.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """Resolve the root folder that holds the data sets (one sub-folder per data set)."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("MOEKIT_DATA")
    if env:
        return Path(env).expanduser()
    return REPO_ROOT.parent / "shared" / "datasets"


def cache_dir(*parts: str) -> Path:
    """A writable cache folder (created on demand): ``$MOEKIT_CACHE`` or ``<repo>/.cache``."""
    root = Path(os.environ.get("MOEKIT_CACHE") or REPO_ROOT / ".cache").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def require_file(path: str | os.PathLike, *, sha256: str | None, url: str, what: str) -> Path:
    """Check that a data file exists (and matches its sha256 when given); raise a helpful error if not.

    Args:
        path: expected location of the file.
        sha256: expected hex digest, or None to skip the check (user-supplied files).
        url: public download location, quoted in the error for users with internet.
        what: human name of the data set, for messages.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"{what}: file {p} not found. Set MOEKIT_DATA (or the config's data_dir) to the folder holding "
            f"the data sets, or download it from {url}"
        )
    if sha256 is not None:
        got = sha256_file(p)
        if got != sha256:
            raise ValueError(
                f"{what}: sha256 mismatch for {p}: expected {sha256}, got {got}. Re-download from {url}"
            )
    return p
