"""The scripts under scripts/ that are not run by other tests."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resume_demo_killed_run_resumes_to_identical_results(capsys):
    """A child process killed with SIGKILL after epoch 1 of 3, resumed: the same losses, threshold and scores."""
    demo = _load("resume_demo")
    assert demo.main(["--epochs", "3", "--kill-after", "1", "--image-size", "32", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "exit code -9" in out and "identical: True" in out
    assert "| B killed + resumed | 1 | 3 |" in out  # the second attempt really resumed


def test_resume_demo_refuses_an_impossible_kill_point():
    demo = _load("resume_demo")
    import pytest

    with pytest.raises(SystemExit):
        demo.main(["--epochs", "3", "--kill-after", "3"])
