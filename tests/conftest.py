"""Shared fixtures: the real-data folder (skips clearly when absent) and small generated data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _real_data_dir() -> Path:
    value = os.environ.get("ANOMALIB_STUDY_DATA")
    return Path(value) if value else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real data folder ($ANOMALIB_STUDY_DATA, default ../shared/data); skips if absent."""
    root = _real_data_dir()
    if not (root / "README.md").is_file():
        pytest.skip(
            f"real data not found at {root}: set ANOMALIB_STUDY_DATA to the shared data folder "
            "(CI sets it to ../shared/data)"
        )
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own feature cache, so no test depends on another's leftovers, and the
    patch cache at its default size (a benchmark's main() turns it off in its process: undone here)."""
    monkeypatch.setenv("ANOMALIB_STUDY_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("ANOMALIB_STUDY_PATCH_CACHE_GB", os.environ.get("ANOMALIB_STUDY_PATCH_CACHE_GB", ""))


def hold_lock(lock_path, seconds: float = 30.0):
    """A second process holding ``lock_path`` (:func:`anomalib_study.io.folder_lock`) for
    ``seconds``; returned (a ``subprocess.Popen``) once it holds it."""
    import subprocess
    import sys

    code = (
        "import sys, time; from anomalib_study.io import folder_lock\n"
        "with folder_lock(sys.argv[1], 'x'):\n"
        "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(lock_path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "held"
    return child
