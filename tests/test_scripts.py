"""The scripts under scripts/ that are not run by other tests."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
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


def test_results_table_best_pairs_rank_two_backbones_across_settings(tmp_path, capsys):
    """Known answers on one data set ("data" mvtec_ad/set) under three dataset keys: a / 1 + b / 10 =
    [2, 3, 4, 4.5] separates the classes (1.0, gain 0.25 over b's 0.75), a2 + b too (gain 0: a2 alone is
    1.0); a and a2 share a backbone (never paired); a report scored on other images is left out."""
    import pytest
    from test_comparison import _scored, _write

    from anomalib_study import comparison

    table_script = _load("results_table_patchcore")
    folder = tmp_path / "reports" / "02_patchcore"
    _write(folder, "set-a", _scored("a", [1.0, 2.0, 3.0, 0.5], 1.0, image_auroc=0.5))
    _write(folder, "set-b", _scored("b", [10.0, 10.0, 10.0, 40.0], 10.0, image_auroc=0.75))
    for name, config, scores, paths in (
        ("set448-a2", "a", [1.0, 2.0, 3.0, 4.0], ("a", "b", "c", "d")),
        ("set322-c", "c", [1.0, 1.0, 1.0, 1.0], ("a", "b", "c", "d")),
        ("other-d", "d", [1.0, 2.0, 3.0, 4.0], ("d", "c", "b", "a")),
    ):
        metrics = _scored(config, scores, 1.0, paths=paths, image_auroc=1.0 if config == "a" else 0.5)
        metrics["_run"]["dataset"] = name.split("-")[0]
        _write(folder, name, metrics)
    reports = comparison.collect_reports(tmp_path / "reports")
    table = table_script.best_pairs_table(reports, top=2)
    assert list(table.columns) == list(table_script.PAIR_COLUMNS) and set(table["data"]) == {"mvtec_ad/set"}
    assert list(table["cells"]) == ["set-a + set-b", "set-b + set448-a2"]
    assert table.iloc[0]["fused_auroc"] == pytest.approx(1.0) and table.iloc[0]["gain"] == pytest.approx(0.25)
    assert table.iloc[1]["fused_auroc"] == pytest.approx(1.0) and table.iloc[1]["gain"] == pytest.approx(0.0)
    assert "d" not in " + ".join(table["backbones"]).split(" + ")
    assert len(table_script.best_pairs_table(reports, top=10)) == 5  # a+b, a+c, b+a2, b+c, a2+c
    with pytest.raises(ValueError, match="top"):
        table_script.best_pairs_table(reports, top=0)
    table_script.pairs(tmp_path / "reports", top=1)
    assert "| mvtec_ad/set | set-a + set-b | 0.500, 0.750 | 0.750 | 1.000 | +0.250 | 4 |" in capsys.readouterr().out
