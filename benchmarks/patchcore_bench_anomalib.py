"""anomalib's side of bench_patchcore.py: its fit + predict in its own venv (``anomalib_side.py``
in a subprocess), the result stored in the work folder and reused when the images and settings match.
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from pathlib import Path

from patchcore_bench_data import (
    ANOMALIB_SIDE,
    BACKBONE,
    CORESET_RATIO,
    DEFAULT_VENV,
    LAYERS,
    N_TEST,
    log,
    magnetic_tile_lists,
    preprocessing_of,
    write_list,
)
from patchcore_bench_ratios import coreset_rate_profile


# --------------------------------------------------------------------------------------
# anomalib's side (subprocess in its venv)
# --------------------------------------------------------------------------------------
def anomalib_python(venv: Path = DEFAULT_VENV) -> Path:
    """The venv's python; StudyError with the fix when the venv is missing."""
    from anomalib_study.errors import StudyError

    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        raise StudyError(
            f"anomalib venv not found at {venv}: run `bash benchmarks/setup_anomalib_venv.sh` "
            "(or set ANOMALIB_VENV to its folder)"
        )
    return python


def run_anomalib(
    n_train: int,
    work: Path,
    data: Path,
    venv: Path = DEFAULT_VENV,
    n_test: int = N_TEST,
    ratio: float = CORESET_RATIO,
    threads: int = 2,
    reuse: bool = True,
) -> dict:
    """anomalib's fit + predict on the first ``n_train`` training images, in its own process.

    Result (the JSON of anomalib_side.py) is cached as ``work/anomalib_<n>.json`` keyed by
    the image lists' hashes and the parameters; ``reuse`` takes a matching cached result.
    """
    from anomalib_study.errors import StudyError
    from anomalib_study.io import write_json

    work.mkdir(parents=True, exist_ok=True)
    train, test = magnetic_tile_lists(data, n_train, n_test)
    train_sha = write_list(train, work / f"train_{n_train}.txt")
    test_sha = write_list(test, work / f"test_{n_test}.txt")
    pre = preprocessing_of()
    key = {
        "train_sha256": train_sha,
        "test_sha256": test_sha,
        "ratio": ratio,
        "threads": threads,
        "backbone": BACKBONE,
        "layers": list(LAYERS),
        "preprocessing": pre,
    }
    cached = work / f"anomalib_{n_train}.json"
    if reuse and cached.is_file():
        previous = json.loads(cached.read_text())
        if previous.get("key") == key:
            log(f"anomalib N={n_train}: reusing {cached} (measured {previous.get('measured_at')})")
            return _with_rate_profile(previous, work / f"anomalib_{n_train}.log")
    command = [
        str(anomalib_python(venv)),
        "-W",
        "ignore",
        str(ANOMALIB_SIDE),
        "--train-list",
        str(work / f"train_{n_train}.txt"),
        "--test-list",
        str(work / f"test_{n_test}.txt"),
        "--preprocessing",
        json.dumps(pre),
        "--backbone",
        BACKBONE,
        "--layers",
        *LAYERS,
        "--coreset-ratio",
        str(ratio),
        "--threads",
        str(threads),
    ]
    log(f"anomalib N={n_train}: running in {venv} ...")
    started = _dt.datetime.now().isoformat(timespec="seconds")
    stderr_log = work / f"anomalib_{n_train}.log"  # progress of a long run: tail -f this file
    with open(stderr_log, "w", encoding="utf-8") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=str(work))
    if done.returncode != 0:
        tail = stderr_log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise StudyError(f"anomalib side failed (exit {done.returncode}) for N={n_train} (log {stderr_log}):\n{tail}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update({"key": key, "measured_at": started, "command": " ".join(command[:4]) + " ..."})
    result = _with_rate_profile(result, stderr_log)
    write_json(cached, result)
    return result


def _with_rate_profile(result: dict, log_path: Path) -> dict:
    """``result`` with ``coreset_rate_profile`` read from anomalib's progress log, where it has none yet."""
    if "coreset_rate_profile" not in result and log_path.is_file():
        result = {
            **result,
            "coreset_rate_profile": coreset_rate_profile(log_path.read_text(encoding="utf-8", errors="replace")),
        }
    return result
