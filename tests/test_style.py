"""The code is ruff-clean: lint and format, as configured in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import REPO

TREES = ["anomalib_study", "tests", "benchmarks", "scripts"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    ruff = shutil.which("ruff")
    command = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    return subprocess.run([*command, *args, *TREES], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module", autouse=True)
def _ruff_installed():
    if (
        shutil.which("ruff") is None
        and subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode != 0
    ):
        pytest.fail("ruff is not installed: bash scripts/install.sh test installs it")


def test_ruff_check_is_clean():
    done = _ruff("check", "--output-format", "concise")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_ruff_format_leaves_every_file_as_it_is():
    done = _ruff("format", "--check")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
