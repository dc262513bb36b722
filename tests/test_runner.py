"""Tests of the study runner, on a tiny throwaway notebook (each papermill run costs ~2 s)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
import yaml

from anomalib_study import runner
from anomalib_study.errors import ParameterError, StudyError

REPO = Path(__file__).resolve().parents[1]

PARAMETERS = '''dataset = "dagm"      # layout
root = ""             # data folder
category = None       # category
backbone = "tiny"     # backbone
device = "cpu"        # device
x = 0.0               # shifts the metric
fail = False          # raise in the body
write = True          # write metrics_out
metrics_out = ""      # metrics JSON
report_name = ""      # report title
'''
# A marker that must never reach the HTML (code inputs are hidden), and outputs that must.
BODY = '''import json, os
CODE_SOURCE_MARKER_7431 = 1
print("VISIBLE_OUTPUT", report_name, os.path.basename(os.getcwd()))
if fail:
    raise ValueError("boom from the notebook")
with open(metrics_out if write else os.devnull, "w") as handle:
    json.dump({"image_auroc": 0.5 + x, "accuracy": 0.25, "root": root, "backbone": backbone,
               "threads": os.environ.get("OMP_NUM_THREADS")}, handle)
'''


def _write_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    removed = nbformat.v4.new_code_cell('print("REMOVED_OUTPUT")')
    removed.metadata["tags"] = ["remove"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny study notebook"), params,
                nbformat.v4.new_code_cell(BODY), removed]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _write_study(path: Path, **overrides) -> Path:
    study = {
        "notebook": "notebooks/tiny.ipynb",
        "title": "Tiny study",
        "headline": ["image_auroc", "accuracy"],
        "parameters": {"x": 0.1},
        "backbones": ["tiny"],
        "datasets": {
            "synth": {"dataset": "dagm", "root": "{synthetic}"},
            "plain": {"dataset": "dagm", "root": "/nowhere/plain", "x": 0.3},
            "real": {"dataset": "mvtec_ad", "root": "{data}/mvtec_ad", "category": "bottle"},
        },
    }
    study.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A throwaway project: notebooks/tiny.ipynb, studies/tiny.yaml; no real data; fixed hashes."""
    _write_notebook(tmp_path / "notebooks" / "tiny.ipynb")
    study = _write_study(tmp_path / "studies" / "tiny.yaml")
    synthetic = tmp_path / "synthetic_set"
    synthetic.mkdir()
    calls = []
    monkeypatch.setattr(runner, "synthetic_root", lambda: calls.append(1) or synthetic)
    # other engineers edit the package while tests run: keep the sources part of the hash fixed
    monkeypatch.setattr(runner, "package_sources_hash", lambda: "fixed")
    monkeypatch.delenv("ANOMALIB_STUDY_DATA", raising=False)
    return {"root": tmp_path, "study": study, "reports": tmp_path / "reports", "synthetic": synthetic,
            "synthetic_calls": calls}


def _run(project, **kwargs):
    lines = []
    results = runner.run_study(project["study"], reports_dir=project["reports"], log=lines.append, **kwargs)
    return {r.name: r for r in results}, lines


# --------------------------------------------------------------------------- without execution


def test_grid_is_datasets_times_backbones_with_later_parameters_winning(project):
    study = runner.read_study(_write_study(project["study"], backbones=["a", "b"]))
    cells = runner.expand_grid(study)
    assert [c.name for c in cells] == ["synth-a", "synth-b", "plain-a", "plain-b", "real-a", "real-b"]
    plain_b = cells[3]
    assert plain_b.parameters == {"x": 0.3, "dataset": "dagm", "root": "/nowhere/plain", "backbone": "b"}
    assert cells[0].parameters["x"] == 0.1  # shared parameter
    assert study.notebook == project["root"] / "notebooks" / "tiny.ipynb"
    assert [c.name for c in runner.select_cells(cells, ["*-a"])] == ["synth-a", "plain-a", "real-a"]
    assert [c.name for c in runner.select_cells(cells, "real-b")] == ["real-b"]
    with pytest.raises(StudyError, match="nope"):
        runner.select_cells(cells, ["nope"])


def test_placeholders_are_resolved_or_the_cell_skipped(tmp_path):
    data = tmp_path / "data"
    (data / "mvtec_ad").mkdir(parents=True)
    made = []

    def synthetic():
        made.append(1)
        return tmp_path / "syn"

    params, reason = runner.resolve_parameters({"root": "{data}/mvtec_ad", "k": 3}, data=data, synthetic=synthetic)
    assert reason is None and params == {"root": f"{data}/mvtec_ad", "k": 3} and not made
    params, reason = runner.resolve_parameters({"root": "{synthetic}"}, data=None, synthetic=synthetic)
    assert reason is None and params["root"] == str(tmp_path / "syn") and made == [1]
    _, reason = runner.resolve_parameters({"root": "{data}/mvtec_ad"}, data=None, synthetic=synthetic)
    assert reason == runner.NEEDS_DATA
    _, reason = runner.resolve_parameters({"root": "{data}/absent"}, data=data, synthetic=synthetic)
    assert "ANOMALIB_STUDY_DATA" in reason and "absent" in reason


@pytest.mark.parametrize("change, key", [
    ({"colour": "red"}, "colour"),
    ({"notebook": "notebooks/missing.ipynb"}, "notebook"),
    ({"datasets": {}}, "datasets"),
    ({"backbones": []}, "backbones"),
    ({"datasets": {"d": {"root": "/x"}}}, "datasets.d"),
    ({"parameters": {"metrics_out": "/tmp/m.json"}}, "parameters.metrics_out"),
    ({"parameters": {"root": "{dat}/x"}}, "parameters.root"),
    ({"headline": "image_auroc"}, "headline"),
])
def test_bad_study_file_names_the_file_and_the_key(project, change, key):
    path = _write_study(project["study"], **change)
    with pytest.raises(StudyError) as caught:
        runner.run_study(path, reports_dir=project["reports"], log=lambda line: None)
    assert f"'{key}'" in str(caught.value) and str(path) in str(caught.value)


def test_missing_notebook_key_and_unknown_notebook_parameter(project):
    path = project["study"]
    path.write_text("backbones: [a]\ndatasets: {d: {dataset: dagm}}\n")
    with pytest.raises(StudyError, match="'notebook'"):
        runner.read_study(path)
    _write_study(path, parameters={"kk": 3})
    with pytest.raises(StudyError, match=r"'parameters\.kk' is not a parameter of tiny\.ipynb"):
        runner.run_study(path, reports_dir=project["reports"], log=lambda line: None)
    with pytest.raises(ParameterError, match="jobs"):
        runner.run_study(path, jobs=0, log=lambda line: None)
    with pytest.raises(StudyError, match="not found"):
        runner.read_study(project["root"] / "nope.yaml")


def test_inputs_hash_changes_with_each_input(project):
    notebook = project["root"] / "notebooks" / "tiny.ipynb"
    base = runner.inputs_hash(notebook, {"x": 1, "metrics_out": "/a"}, None, "s")
    assert base == runner.inputs_hash(notebook, {"x": 1, "metrics_out": "/b"}, None, "s")  # temp path ignored
    assert base != runner.inputs_hash(notebook, {"x": 2}, None, "s")
    assert base != runner.inputs_hash(notebook, {"x": 1}, Path("/data"), "s")
    assert base != runner.inputs_hash(notebook, {"x": 1}, None, "t")
    notebook.write_text(notebook.read_text() + " ")
    assert base != runner.inputs_hash(notebook, {"x": 1}, None, "s")


def test_index_is_deterministic_and_lists_benchmarks(tmp_path):
    folder = tmp_path / "nb"
    run = {"dataset": "d", "backbone": "b", "headline": ["image_auroc"], "status": "ok", "duration_s": 1.25,
           "title": "T"}
    (folder).mkdir()
    (folder / "d-b.metrics.json").write_text(json.dumps({"image_auroc": 0.91234, "synthetic": True, "_run": run}))
    (folder / "d-b.html").write_text("<html></html>")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "search.json").write_text("{}")
    first = runner.write_index(tmp_path).read_text()
    assert runner.write_index(tmp_path).read_text() == first
    assert "0.912" in first and "synthetic, not DAGM" in first and "benchmarks/search.json" in first
    assert "nb/d-b.html" in first and "http" not in first


# --------------------------------------------------------------------------- with execution


def test_run_rerun_failure_and_recovery(project):
    reports, out = project["reports"], project["reports"] / "tiny"

    # first run: 2 executions; the {data} cell is skipped with the message
    results, lines = _run(project)
    assert {n: r.status for n, r in results.items()} == {"synth-tiny": "ok", "plain-tiny": "ok", "real-tiny": "skipped"}
    assert results["real-tiny"].message == runner.NEEDS_DATA
    assert any("real-tiny: skipped, needs the real data" in line for line in lines)
    assert any("synth-tiny: ok in" in line and "image_auroc=0.600" in line for line in lines)
    assert runner.exit_code(results.values()) == 0
    assert project["synthetic_calls"] == [1]

    for name, auroc, root in [("synth-tiny", 0.6, str(project["synthetic"])), ("plain-tiny", 0.8, "/nowhere/plain")]:
        metrics = json.loads((out / f"{name}.metrics.json").read_text())
        assert metrics["image_auroc"] == pytest.approx(auroc) and metrics["root"] == root
        assert metrics["_run"]["status"] == "ok" and metrics["_run"]["parameters"]["report_name"] == name
        assert metrics["_run"]["duration_s"] > 0 and len(metrics["_run"]["inputs_hash"]) == 64
        assert metrics["synthetic"] is (name == "synth-tiny")
        page = (out / f"{name}.html").read_text()
        assert "VISIBLE_OUTPUT" in page and f"VISIBLE_OUTPUT {name} notebooks" in page  # cwd = notebook folder
        assert "CODE_SOURCE_MARKER_7431" not in page  # code inputs hidden
        assert "REMOVED_OUTPUT" not in page  # cells tagged remove dropped
        executed = nbformat.read(out / f"{name}.ipynb", as_version=4)
        assert any("CODE_SOURCE_MARKER_7431" in c.source for c in executed.cells)
    assert not list(out.glob(".*")), "no staging leftovers"
    index = (reports / "index.html").read_text()
    assert "tiny/synth-tiny.html" in index and "tiny/plain-tiny.html" in index
    assert "0.600" in index and "0.800" in index and "synthetic, not DAGM" in index

    # rerun: nothing changed -> nothing executed
    good_html = (out / "plain-tiny.html").read_text()
    results, _ = _run(project)
    assert results["synth-tiny"].status == results["plain-tiny"].status == "unchanged"
    assert results["plain-tiny"].metrics["image_auroc"] == pytest.approx(0.8)

    # one cell's parameter changes -> only that cell reruns (1 execution)
    study = yaml.safe_load(project["study"].read_text())
    study["datasets"]["plain"]["x"] = 0.4
    project["study"].write_text(yaml.safe_dump(study))
    results, _ = _run(project)
    assert results["plain-tiny"].status == "ok" and results["synth-tiny"].status == "unchanged"
    assert results["plain-tiny"].metrics["image_auroc"] == pytest.approx(0.9)
    good_html = (out / "plain-tiny.html").read_text()
    good_metrics = (out / "plain-tiny.metrics.json").read_text()

    # the cell now fails -> reported, last good report kept, non-zero status (1 execution)
    study["datasets"]["plain"]["fail"] = True
    project["study"].write_text(yaml.safe_dump(study))
    results, lines = _run(project, only=["plain-*"])
    failed = results["plain-tiny"]
    assert list(results) == ["plain-tiny"]
    assert failed.status == "failed" and "ValueError" in failed.message and "boom" in failed.message
    assert runner.exit_code(results.values()) == 1
    assert any("FAILED" in line and "boom from the notebook" in line for line in lines)
    assert "boom from the notebook" in (out / "plain-tiny.failed.html").read_text()
    assert failed.html == out / "plain-tiny.failed.html"
    assert (out / "plain-tiny.html").read_text() == good_html
    assert (out / "plain-tiny.metrics.json").read_text() == good_metrics
    assert json.loads((out / "plain-tiny.failed.json").read_text())["_run"]["error"]["ename"] == "ValueError"
    index = (reports / "index.html").read_text()
    assert "tiny/plain-tiny.failed.html" in index and "boom from the notebook" in index
    assert "last good report" in index and "tiny/synth-tiny.html" in index

    # fixed again (same inputs as the good run): a failed last run is never "unchanged" (1 execution)
    del study["datasets"]["plain"]["fail"]
    project["study"].write_text(yaml.safe_dump(study))
    results, _ = _run(project, only="plain-tiny")
    assert results["plain-tiny"].status == "ok"
    assert not list(out.glob("plain-tiny.failed.*"))
    index = (reports / "index.html").read_text()
    assert "failed run" not in index and "class='failed'" not in index


def test_notebook_without_metrics_fails_and_unknown_kernel_is_refused(project):
    path = _write_study(project["study"], datasets={"plain": {"dataset": "dagm", "write": False}})
    with pytest.raises(StudyError, match="kernel 'no-such-kernel' is not installed"):
        _run(project, kernel_name="no-such-kernel")
    results, _ = _run(project)
    assert results["plain-tiny"].status == "failed" and "MissingMetrics" in results["plain-tiny"].message
    out = project["reports"] / "tiny"
    assert (out / "plain-tiny.failed.ipynb").is_file() and not (out / "plain-tiny.html").exists()
    assert "VISIBLE_OUTPUT" in (out / "plain-tiny.failed.html").read_text()
    assert json.loads((out / "plain-tiny.failed.json").read_text())["_run"]["status"] == "failed"
    assert "plain-tiny.failed.html" in (project["reports"] / "index.html").read_text()
    assert path.is_file()


def test_parallel_jobs_give_the_same_outputs(project):
    results, _ = _run(project, jobs=2, force=True, kernel_name="python3")
    assert results["synth-tiny"].metrics["image_auroc"] == pytest.approx(0.6)
    assert results["plain-tiny"].metrics["image_auroc"] == pytest.approx(0.8)
    # each of the 2 kernels gets cpu_count // 2 threads, unless the user set them
    expected = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // 2))
    assert results["plain-tiny"].metrics["threads"] == expected
    out = project["reports"] / "tiny"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}-tiny.{ext}" for n in ("synth", "plain") for ext in ("html", "ipynb", "metrics.json"))


def test_shipped_study_files_are_valid():
    studies = sorted((REPO / "studies").glob("*.yaml"))
    assert {p.name for p in studies} >= {"default.yaml", "knn.yaml"}
    for path in studies:
        study = runner.read_study(path)
        cells = runner.expand_grid(study)
        runner.check_notebook_parameters(study, cells)
        assert cells
    default = runner.expand_grid(runner.read_study(REPO / "studies" / "default.yaml"))
    assert [c.name for c in default] == ["synthetic_dagm-efficientnet_lite0"]
    knn = runner.expand_grid(runner.read_study(REPO / "studies" / "knn.yaml"))
    assert len(knn) == 16 and {c.backbone for c in knn} == {"efficientnet_lite0", "dinov2_vits14"}
