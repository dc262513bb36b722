"""anomalib_study.io helpers that no other module's tests cover."""

from pathlib import Path

import numpy as np
import pytest

from anomalib_study.io import as_json
from conftest import hold_lock


def test_as_json_is_what_a_json_file_reads_back():
    value = {
        "size": (224, 224),
        "mean": np.array([0.5, 0.25], dtype=np.float32),
        "n": np.int64(3),
        "path": Path("a/b"),
        "other": object,
    }
    out = as_json(value)
    assert out["size"] == [224, 224] and out["mean"] == [0.5, 0.25] and out["n"] == 3
    assert out["path"] == "a/b" and out["other"] == str(object)


def test_run_dir_in_progress_appears_only_when_complete(tmp_path):
    import pytest

    from anomalib_study.io import run_dir_in_progress

    with run_dir_in_progress(tmp_path / "runs") as run:
        (run.path / "scores.csv").write_text("a\n")
        assert run.path.name.startswith(".") and run.path.name.endswith(".partial") and run.final is None
        assert [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")] == []
    assert run.final.parent == tmp_path / "runs" and not run.final.name.startswith(".")
    assert (run.final / "scores.csv").read_text() == "a\n" and not run.path.exists()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C: the partial folder is removed, nothing else touched
        with run_dir_in_progress(tmp_path / "runs") as other:
            (other.path / "x").write_text("half")
            raise KeyboardInterrupt
    assert sorted((tmp_path / "runs").iterdir()) == [run.final]
    with run_dir_in_progress(tmp_path / "runs") as second:
        pass
    assert second.final != run.final and len(list((tmp_path / "runs").iterdir())) == 2


def test_a_full_disk_is_one_message_naming_the_file_and_the_earlier_file_is_kept(tmp_path, monkeypatch):
    import errno

    import pytest

    from anomalib_study import io
    from anomalib_study.errors import DiskFullError, StudyError

    target = tmp_path / "out" / "metrics.json"
    io.write_json(target, {"kept": 1})

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(
        DiskFullError, match=r"could not write .*metrics\.json: no space left on the device \(.* MB left"
    ):
        io.write_json(target, {"new": 2})
    assert issubclass(DiskFullError, StudyError)  # the command line prints it on one line, exit status 2
    assert io.read_json_object(target) == {"kept": 1}  # the earlier result, whole
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temporary file left


@pytest.mark.slow
def test_a_second_process_is_refused_naming_the_holder_or_waits_for_it(tmp_path):
    import time

    import pytest

    from anomalib_study import io
    from anomalib_study.errors import StudyError

    lock = tmp_path / "reports" / ".run.lock"
    child = hold_lock(lock, 3)
    try:
        with pytest.raises(StudyError, match=rf"the reports folder is in use by process {child.pid} on .*: wait"):
            with io.folder_lock(lock, "the reports folder", wait=False):
                pass
        said = []
        started = time.perf_counter()
        with io.folder_lock(lock, "the database folder", notify=said.append):
            waited = time.perf_counter() - started
        assert waited > 1.0 and len(said) == 1 and f"in use by process {child.pid}" in said[0]
        assert "waiting for it to finish" in said[0]
    finally:
        child.wait(timeout=30)
    with io.folder_lock(lock, "free now", wait=False):  # released when its holder ended
        assert (lock.parent / ".run.lock.owner").read_text().startswith("process ")
    assert not (lock.parent / ".run.lock.owner").exists()
