"""`anomalib-study verify` and the provenance of every report, on a tiny deterministic notebook
(each papermill run costs a few seconds) in a throwaway git repository."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from pathlib import Path

import nbformat
import pytest
import yaml

from anomalib_study import provenance, runner, verify
from anomalib_study.cli import main
from anomalib_study.errors import ParameterError, StudyError

PARAMETERS = """dataset = "dagm"      # layout
root = ""             # data folder
backbone = "tiny"     # backbone
x = 0.0               # shifts the metric
metrics_out = ""      # metrics JSON
report_name = ""      # report title
"""
# deterministic figures, plus what changes from run to run and must not count: times, paths, the environment
BODY = """import json, time
metrics = {"image_auroc": 0.5 + x, "nested": {"scores": [0.25, 1.5, x], "label": "same", "flag": True},
           "timings": {"fit_s": time.time()}, "predict_s": time.time(), "root": root,
           "per_image": [{"path": f"/somewhere/{time.time()}.png", "score": 0.125}],
           "environment": {"started": time.time()}}
with open(metrics_out, "w") as handle:
    json.dump(metrics, handle)
"""


def _write_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny verify notebook"), params, nbformat.v4.new_code_cell(BODY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _write_study(path: Path, datasets: dict | None = None) -> Path:
    study = {
        "notebook": "notebooks/tiny.ipynb",
        "title": "Tiny",
        "headline": ["image_auroc"],
        "parameters": {"x": 0.1},
        "backbones": ["tiny"],
        "datasets": datasets
        or {
            "synth": {"dataset": "dagm", "root": "{synthetic}"},
            "real": {"dataset": "mvtec_ad", "root": "{data}/mvtec_ad"},
        },
    }
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def _folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git repository with notebooks/tiny.ipynb, studies/tiny.yaml and its committed reports
    (cell synth-tiny run; real-tiny needs the real data and has no report)."""
    root = tmp_path_factory.mktemp("project")
    _write_notebook(root / "notebooks" / "tiny.ipynb")
    (root / "studies").mkdir()
    study = _write_study(root / "studies" / "tiny.yaml")
    synthetic = root / "synthetic_set"
    synthetic.mkdir()
    _git(root, "init", "-q")
    _git(root, "add", "notebooks", "studies")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "tiny project")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "synthetic_root", lambda: synthetic)
        patch.delenv("ANOMALIB_STUDY_DATA", raising=False)
        patch.chdir(root)  # as `anomalib-study run studies/tiny.yaml` from the repository: _run.study is relative
        results = runner.run_study(
            study.relative_to(root), reports_dir="reports", only=["synth-*"], log=lambda line: None
        )
    assert [r.status for r in results] == ["ok"]
    return {"root": root, "study": study, "reports": root / "reports", "synthetic": synthetic}


@pytest.fixture
def reports(project, tmp_path, monkeypatch):
    """A copy of the committed reports (tests may tamper with it), verified from the project folder."""
    import shutil

    copy = project["root"] / f"reports-{tmp_path.name}"
    shutil.copytree(project["reports"], copy)
    monkeypatch.setattr(runner, "synthetic_root", lambda: project["synthetic"])
    monkeypatch.delenv("ANOMALIB_STUDY_DATA", raising=False)
    monkeypatch.chdir(project["root"])
    yield copy
    shutil.rmtree(copy)


def _committed(reports: Path, cell: str = "synth-tiny") -> Path:
    return reports / "tiny" / f"{cell}.metrics.json"


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- provenance


def test_every_report_records_its_provenance(project):
    run = json.loads(_committed(project["reports"]).read_text())["_run"]
    recorded = run["provenance"]
    assert list(recorded) == list(provenance.FIELDS)
    assert recorded["git_commit"] == _git(project["root"], "rev-parse", "HEAD") and recorded["git_dirty"] is False
    assert recorded["logical_cores"] >= 1 and recorded["cpu_model"] and recorded["python"]
    assert recorded["gpu"] == "none"  # no GPU on the test machines
    # the runner gives every kernel its thread count; the kernel's own torch count is evaluate's to record
    assert recorded["threads"]["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    assert recorded["threads"]["torch"] is None


def test_git_state_outside_a_checkout_and_dirty_tree(tmp_path, project):
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None}
    assert provenance.git_state(tmp_path / "missing") == {"commit": None, "dirty": None}
    notebook = project["root"] / "notebooks" / "tiny.ipynb"
    assert provenance.git_state(notebook)["dirty"] is False  # a file: its folder's checkout
    original = notebook.read_bytes()
    try:
        notebook.write_bytes(original + b"\n")
        assert provenance.git_state(notebook)["dirty"] is True
    finally:
        notebook.write_bytes(original)


def test_environment_records_the_weights_the_model_used():
    from types import SimpleNamespace

    from anomalib_study.evaluate import _environment
    from anomalib_study.methods import get_method

    net = SimpleNamespace(weights_sha256="ab" * 32)
    autoencoder = get_method("autoencoder")
    assert _environment(autoencoder, net, {"model": "pretrained", "seed": 3}, "cpu")["weights_sha256"] == "ab" * 32
    conv = _environment(autoencoder, net, {"model": "conv", "seed": 3}, "cpu")
    assert conv["weights_sha256"] == "none" and conv["seed"] == 3
    knn = _environment(get_method("knn"), net, {"k": 5}, "cpu")
    assert knn["weights_sha256"] == "ab" * 32 and "seed" not in knn
    assert {"cpu_model", "threads", "gpu", "torch", "git_commit", "anomalib_study", "device"} <= set(knn)


# --------------------------------------------------------------------------- comparing


def test_compare_metrics_rules():
    committed = {
        "auroc": 0.5,
        "n": 3,
        "ok": True,
        "name": "a",
        "rows": [{"s": 1.0}, {"s": 2.0}],
        "nan": float("nan"),
        "fit_s": 1.0,
        "timings": {"x": 1},
        "root": "/a",
        "per_image": [{"path": "/a"}],
        "environment": {"cpu": "A"},
        "_run": {"cell": "c"},
        "peak_memory": {"rss": 1},
    }
    same = json.loads(json.dumps(committed))  # NaN survives the round trip in Python's JSON
    same.update(
        fit_s=9.0,
        timings={"x": 2},
        root="/b",
        per_image=[{"path": "/b"}],
        environment={"cpu": "B"},
        _run={"cell": "d"},
        peak_memory={"rss": 2},
    )
    compared, matched, drifts = verify.compare_metrics(committed, same)
    assert (compared, matched, drifts) == (7, 7, [])  # auroc, n, ok, name, rows[0].s, rows[1].s, nan

    changed = {**same, "auroc": 0.5 + 1e-9, "ok": 1, "rows": [{"s": 1.0}], "extra": None}
    compared, matched, drifts = verify.compare_metrics(committed, changed)
    keys = {d.key: d for d in drifts}
    assert set(keys) == {"auroc", "ok", "rows[1].s", "extra"} and compared == 8 and matched == 4
    assert keys["auroc"].difference == pytest.approx(1e-9)
    assert keys["ok"].difference is None  # True against 1: a bool is not a number here
    assert keys["rows[1].s"].new is verify.MISSING and keys["extra"].committed is verify.MISSING
    assert "committed 2.0, re-run (missing)" in keys["rows[1].s"].describe()

    _, _, drifts = verify.compare_metrics(committed, changed, tolerance=1e-6)
    assert "auroc" not in {d.key for d in drifts}
    with pytest.raises(ParameterError, match="tolerance"):
        verify.compare_metrics(committed, committed, tolerance=-1)
    assert not math.isnan(verify.VerifyResult("r", "drifted", drifts=[verify.Drift("k", 1, 3, 2.0)]).worst.difference)


def test_provenance_differences_name_each_field():
    base = {
        "_run": {
            "provenance": {"git_commit": "a" * 40, "cpu_model": "CPU A", "threads": {"OMP_NUM_THREADS": "2"}},
            "parameters": {"x": 0.1},
        },
        "environment": {"weights_sha256": "1" * 64, "seed": 0},
    }
    assert verify.provenance_differences(base, base) == []
    other = json.loads(json.dumps(base))
    other["_run"]["provenance"].update(git_commit="b" * 40, cpu_model="CPU B")
    other["_run"]["parameters"]["x"] = 0.2
    other["environment"]["weights_sha256"] = "2" * 64
    lines = verify.provenance_differences(base, other)
    assert lines == [
        "commit: aaaaaaaaaaaa -> bbbbbbbbbbbb",
        "CPU: CPU A -> CPU B",
        "weights hash: 111111111111 -> 222222222222",
        "parameter x: 0.1 -> 0.2",
    ]
    old = {"_run": {}, "environment": {"seed": 0, "weights_sha256": "1" * 64}}
    assert verify.provenance_differences(old, base)[0].startswith("the committed report has no _run.provenance")


# --------------------------------------------------------------------------- re-running


def test_verify_matches_and_never_writes_into_the_reports(reports):
    before = _folder_hash(reports)
    lines = []
    results = verify.verify_reports(reports, log=lines.append)
    assert [(r.report, r.status) for r in results] == [("tiny/synth-tiny", "matched")]
    result = results[0]
    # image_auroc, nested.scores[0..2], nested.label, nested.flag, per_image[0].score and the runner's
    # synthetic flag; times, paths and the environment are left out
    assert result.compared == result.matched == 8 and result.drifts == [] and result.differences == []
    assert result.rerun is None  # the temporary scratch folder is gone
    assert verify.exit_code(results) == 0
    assert _folder_hash(reports) == before
    row = next(line for line in lines[-1].splitlines() if line.startswith("tiny/synth-tiny"))
    assert row.split()[1:5] == ["matched", "8", "8", "0"] and lines[-1].endswith("verify: 1 matched")


def test_a_tampered_metric_is_a_drift_with_both_values(reports, capsys):
    def change(data):
        data["image_auroc"] = 0.601
        del data["nested"]["flag"]  # as in a report written before the code added a key

    _edit(_committed(reports), change)
    before = _folder_hash(reports)
    code = main(["verify", "--reports", str(reports), "--only", "tiny/synth-tiny"])
    out = capsys.readouterr().out
    assert code == 1
    assert "drifted" in out and "image_auroc: committed 0.601, re-run 0.6" in out and "|difference| 0.001" in out
    assert "1 key(s) only in the re-run: nested.flag" in out and out.rstrip().endswith("verify: 1 drifted")
    assert _folder_hash(reports) == before


def test_tolerance_and_a_changed_commit_or_machine_is_a_difference_not_a_drift(reports, tmp_path):
    def change(data):
        data["image_auroc"] = 0.601  # within the tolerance below
        data["_run"]["provenance"].update(
            git_commit="0" * 40, cpu_model="Some Other CPU", threads={"OMP_NUM_THREADS": "64", "torch": None}
        )

    _edit(_committed(reports), change)
    lines = []
    results = verify.verify_reports(reports, tolerance=0.01, scratch=tmp_path / "scratch", log=lines.append)
    result = results[0]
    assert result.status == "matched" and verify.exit_code(results) == 0
    assert result.differences[0] == f"commit: 000000000000 -> {_git(reports.parent, 'rev-parse', 'HEAD')[:12]}"
    assert any(line.startswith("CPU: Some Other CPU -> ") for line in result.differences)
    assert any(line.startswith("threads (OMP_NUM_THREADS): 64 -> ") for line in result.differences)
    assert "differs: commit: 000000000000" in lines[-1] and "absolute tolerance 0.01" in lines[-1]
    # --keep-scratch keeps the re-run
    assert result.rerun == tmp_path / "scratch" / "tiny" / "synth-tiny.metrics.json" and result.rerun.is_file()


def test_real_data_cells_are_skipped_not_drifts(reports, project):
    import shutil

    shutil.copy(_committed(reports), _committed(reports, "real-tiny"))  # a report made with the real data
    for suffix in (".ipynb", ".html"):
        shutil.copy(reports / "tiny" / f"synth-tiny{suffix}", reports / "tiny" / f"real-tiny{suffix}")
    _edit(_committed(reports, "real-tiny"), lambda data: data["_run"].update(cell="real-tiny"))
    results = verify.verify_reports(reports, only=["real-*"], log=lambda line: None)
    assert [(r.status, r.message) for r in results] == [("skipped", runner.NEEDS_DATA)]
    assert verify.exit_code(results) == 0


def test_a_missing_study_file_or_cell_fails_with_a_clear_message(reports, project):
    _edit(_committed(reports), lambda data: data["_run"].update(study="studies/gone.yaml"))
    results = verify.verify_reports(reports, log=lambda line: None)
    assert results[0].status == "failed" and "study file studies/gone.yaml" in results[0].message
    assert "not found" in results[0].message and verify.exit_code(results) == 1

    other = _write_study(
        project["root"] / "studies" / "renamed.yaml", datasets={"other": {"dataset": "dagm", "root": "{synthetic}"}}
    )
    _edit(_committed(reports), lambda data: data["_run"].update(study=str(other)))
    results = verify.verify_reports(reports, log=lambda line: None)
    assert results[0].status == "failed"
    message = results[0].message
    assert message.startswith("cell synth-tiny is no longer in study file") and "other-tiny" in message


def test_an_incomplete_report_or_a_corrupt_metrics_file_is_named(reports):
    import shutil

    for suffix in (".ipynb", ".html"):  # a second report whose metrics file is cut short
        shutil.copy(reports / "tiny" / f"synth-tiny{suffix}", reports / "tiny" / f"bad-tiny{suffix}")
    _committed(reports, "bad-tiny").write_text('{"image_auroc": 0.8,')
    results = verify.verify_reports(reports, only=["bad-tiny"], log=lambda line: None)
    assert results[0].status == "failed" and "is not valid JSON (" in results[0].message
    assert "line 1, column" in results[0].message
    page = reports / "tiny" / "synth-tiny.html"
    original = page.read_bytes()
    page.write_bytes(original + b"<!-- another run's page -->")  # replaced in part
    results = verify.verify_reports(reports, only=["synth-tiny"], log=lambda line: None)
    assert results[0].status == "failed" and "do not match its metrics" in results[0].message
    page.write_bytes(original)
    (reports / "tiny" / "synth-tiny.ipynb").unlink()
    results = verify.verify_reports(reports, only=["synth-tiny"], log=lambda line: None)
    assert results[0].status == "failed" and verify.exit_code(results) == 1
    assert "incomplete: synth-tiny.ipynb missing beside synth-tiny.metrics.json" in results[0].message


def test_bad_arguments_are_refused_before_any_run(reports, capsys):
    with pytest.raises(StudyError, match="--only 'nothing-\\*' matches no committed report"):
        verify.verify_reports(reports, only=["nothing-*"])
    with pytest.raises(ParameterError, match="outside the reports folder"):
        verify.verify_reports(reports, scratch=reports / "scratch")
    with pytest.raises(StudyError, match="reports folder .* not found"):
        verify.verify_reports(reports / "missing")
    assert main(["verify", "--reports", str(reports), "--keep-scratch", str(reports)]) == 2
    assert "outside the reports folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["verify", "--tolerance", "-1"])
    assert not (reports / "scratch").exists()


@pytest.mark.slow
def test_verify_regenerates_a_real_notebook_report_on_the_synthetic_set(tmp_path):
    """Notebook 01 (kNN) on the generated synthetic set: run, then verify -> every key matches."""
    repo = Path(__file__).resolve().parents[1]
    study = tmp_path / "studies" / "knn_synthetic.yaml"
    study.parent.mkdir()
    study.write_text(
        yaml.safe_dump(
            {
                "notebook": str(repo / "notebooks" / "01_knn_detection.ipynb"),
                "title": "kNN, synthetic",
                "headline": ["image_auroc"],
                "parameters": {"k": 5, "k_sweep": [1, 5]},
                "backbones": ["efficientnet_lite0"],
                "datasets": {"synthetic_dagm": {"dataset": "dagm", "root": "{synthetic}"}},
            }
        )
    )
    reports = tmp_path / "reports"
    (ran,) = runner.run_study(study, reports_dir=reports, log=lambda line: None)
    assert ran.status == "ok", ran.message
    before = _folder_hash(reports)
    lines: list[str] = []
    (result,) = verify.verify_reports(reports, log=lines.append)
    assert result.status == "matched", "\n".join(lines)
    assert result.compared == result.matched > 50 and not result.drifts
    assert verify.exit_code([result]) == 0
    assert _folder_hash(reports) == before
