"""Where a report came from: package version, git commit, machine, threads, GPU, library versions.

:func:`collect` is recorded by the runner in every report's ``_run["provenance"]`` and (in
the notebook's own process) by ``evaluate`` in ``metrics["environment"]``;
``anomalib-study verify`` names the fields that differ between a committed report and its
re-run. Nothing here fails: what cannot be found is None (outside a git checkout, no
``/proc/cpuinfo``, no git executable, ...), and torch is never imported here (it costs
seconds): its thread count and GPU are read only when the calling process has loaded it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from anomalib_study import __version__

__all__ = ["FIELDS", "collect", "cpu_model", "git_state", "gpu_name"]

#: the keys of :func:`collect`'s record, in order
FIELDS = (
    "package_version",
    "git_commit",
    "git_dirty",
    "cpu_model",
    "logical_cores",
    "threads",
    "gpu",
    "python",
    "torch",
    "platform",
)

_GIT_TIMEOUT_S = 10


def git_state(folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit": <HEAD sha> | None, "dirty": bool | None}`` of the git checkout holding ``folder``
    (default: the current folder). ``dirty``: tracked files differ from HEAD (untracked files,
    such as new reports, do not count). Both None outside a checkout or without git."""
    folder = Path.cwd() if folder is None else Path(folder)
    if folder.is_file():
        folder = folder.parent
    state: dict[str, Any] = {"commit": None, "dirty": None}
    if shutil.which("git") is None or not folder.is_dir():
        return state
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S
        )
        if head.returncode != 0:
            return state
        state["commit"] = head.stdout.strip() or None
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
        )
        if status.returncode == 0:
            state["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def cpu_model() -> str | None:
    """The CPU's name: ``model name`` of /proc/cpuinfo, else ``platform.processor()``, else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def gpu_name() -> str:
    """The first CUDA device's name, or ``"none"``: from torch when this process has loaded
    it, else from ``nvidia-smi -L``."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            return "none"
        except Exception:  # a broken CUDA install must not stop a run from being recorded
            return "none"
    if shutil.which("nvidia-smi") is None:
        return "none"
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return "none"
    names = [
        line.split(":", 1)[1].split("(UUID")[0].strip()
        for line in listed.stdout.splitlines()
        if listed.returncode == 0 and line.startswith("GPU") and ":" in line
    ]
    return ", ".join(names) or "none"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(repo: str | os.PathLike | None = None, *, torch_threads: bool = True) -> dict[str, Any]:
    """What produced a result, as a JSON-able dict (keys :data:`FIELDS`).

    Args:
        repo: a file or folder inside the git checkout whose commit is recorded (the
            runner passes the notebook); None: the current folder.
        torch_threads: record this process's ``torch.get_num_threads()`` (when torch is
            loaded here). The runner passes False: its kernels are other processes, whose
            torch takes its count from ``OMP_NUM_THREADS``; ``evaluate``, inside the kernel,
            records the count it ran with.

    ``threads`` holds ``OMP_NUM_THREADS`` (as this process and its children see it, None
    if unset) and ``torch`` (the count above, or None); ``logical_cores`` is ``os.cpu_count()``.
    """
    git = git_state(repo)
    torch = sys.modules.get("torch")
    return {
        "package_version": __version__,
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "threads": {
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.get_num_threads() if torch_threads and torch is not None else None,
        },
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "torch": _version("torch") or (str(torch.__version__) if torch is not None else None),
        "platform": platform.platform(),
    }
