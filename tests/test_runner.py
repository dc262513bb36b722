"""Tests of the study runner, on a tiny throwaway notebook (each papermill run costs ~2 s)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from anomalib_study import runner, studies, study_duplicates
from anomalib_study.errors import ParameterError, StudyError

REPO = Path(__file__).resolve().parents[1]

PARAMETERS = """dataset = "dagm"      # layout
root = ""             # data folder
category = None       # category
backbone = "tiny"     # backbone
device = "cpu"        # device
x = 0.0               # shifts the metric
fail = False          # raise in the body
write = True          # write metrics_out
side = False          # also write a side file beside metrics_out
metrics_out = ""      # metrics JSON
report_name = ""      # report title
"""
# A marker that must never reach the HTML (code inputs are hidden), and outputs that must.
BODY = """import json, os
CODE_SOURCE_MARKER_7431 = 1
print("VISIBLE_OUTPUT", report_name, os.path.basename(os.getcwd()))
if fail:
    raise ValueError("boom from the notebook")
with open(metrics_out if write else os.devnull, "w") as handle:
    json.dump({"image_auroc": 0.5 + x, "accuracy": 0.25, "root": root, "backbone": backbone,
               "threads": os.environ.get("OMP_NUM_THREADS")}, handle)
if side:
    with open(metrics_out.replace(".metrics.json", ".all_results.csv"), "w") as handle:
        handle.write("path,score\\n")
"""


def _write_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    removed = nbformat.v4.new_code_cell('print("REMOVED_OUTPUT")')
    removed.metadata["tags"] = ["remove"]
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Tiny study notebook"),
        params,
        nbformat.v4.new_code_cell(BODY),
        removed,
    ]
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
    return {
        "root": tmp_path,
        "study": study,
        "reports": tmp_path / "reports",
        "synthetic": synthetic,
        "synthetic_calls": calls,
    }


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


def test_a_dataset_entry_can_narrow_its_row_to_some_backbones(project):
    datasets = {
        "synth": {"dataset": "dagm", "root": "{synthetic}"},
        "big": {"dataset": "dagm", "root": "/nowhere/big", "x": 0.2, "backbones": ["b"]},
    }
    study = runner.read_study(_write_study(project["study"], backbones=["a", "b"], datasets=datasets))
    cells = runner.expand_grid(study)
    assert [c.name for c in cells] == ["synth-a", "synth-b", "big-b"]
    assert cells[2].parameters == {"x": 0.2, "dataset": "dagm", "root": "/nowhere/big", "backbone": "b"}
    runner.check_notebook_parameters(study, cells)  # "backbones" is not a notebook parameter
    for only, why in (
        (["c"], "'c', which is not in the study's 'backbones'"),
        ([], "non-empty list"),
        (["b", "b"], "each once"),
        ("b", "non-empty list"),
    ):
        bad = _write_study(
            project["study"],
            backbones=["a", "b"],
            datasets={"big": {"dataset": "dagm", "root": "/x", "backbones": only}},
        )
        with pytest.raises(StudyError, match="datasets.big.backbones") as caught:
            runner.read_study(bad)
        assert why in str(caught.value)


VARIANTS = {"conv": {"x": 0.5, "category": "c"}, "pretrained-b2": {"backbone": "b2", "x": 0.7}}


def test_variants_grid_is_datasets_times_variants_with_the_variant_winning(project):
    path = _write_study(project["study"], backbones=None, variants=VARIANTS, parameters={"x": 0.1, "backbone": "b0"})
    text = yaml.safe_load(path.read_text())
    del text["backbones"]
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    study = runner.read_study(path)
    assert study.axis == "variant" and study.backbones == ()
    cells = runner.expand_grid(study)
    assert [c.name for c in cells] == [
        "synth-conv",
        "synth-pretrained-b2",
        "plain-conv",
        "plain-pretrained-b2",
        "real-conv",
        "real-pretrained-b2",
    ]
    assert [c.variant for c in cells[:2]] == ["conv", "pretrained-b2"]
    # shared < dataset entry < variant entry
    assert cells[2].parameters == {
        "x": 0.5,
        "backbone": "b0",
        "dataset": "dagm",
        "root": "/nowhere/plain",
        "category": "c",
    }
    assert cells[3].parameters["x"] == 0.7 and cells[3].parameters["backbone"] == "b2"
    assert (cells[2].backbone, cells[3].backbone) == ("b0", "b2")
    assert cells[4].parameters["category"] == "c"  # the variant's category beats the dataset entry's
    assert [c.name for c in runner.select_cells(cells, "*-conv")] == ["synth-conv", "plain-conv", "real-conv"]
    runner.check_notebook_parameters(study, cells)
    backbones = runner.read_study(_write_study(project["study"], backbones=["a", "b"]))
    assert backbones.axis == "backbone" and backbones.variants is None
    assert all(c.variant is None for c in runner.expand_grid(backbones))


def test_variants_and_backbones_exactly_one_of_the_two(project):
    both = _write_study(project["study"], variants=VARIANTS)
    with pytest.raises(StudyError) as caught:
        runner.read_study(both)
    assert "'backbones'" in str(caught.value) and "'variants'" in str(caught.value) and str(both) in str(caught.value)
    text = yaml.safe_load(both.read_text())
    del text["backbones"], text["variants"]
    both.write_text(yaml.safe_dump(text))
    with pytest.raises(StudyError) as caught:
        runner.read_study(both)
    assert "'backbones'" in str(caught.value) and "missing" in str(caught.value) and str(both) in str(caught.value)
    assert "'variants'" in str(caught.value)


@pytest.mark.parametrize(
    "variants, key",
    [
        ({}, "variants"),
        (["conv"], "variants"),
        ({"bad name": {}}, "variants.bad name"),
        ({"conv": "model"}, "variants.conv"),
        ({"conv": {"report_name": "r"}}, "variants.conv.report_name"),
        ({"conv": {"root": "{nope}"}}, "variants.conv.root"),
    ],
)
def test_bad_variants_name_the_file_and_the_key(project, variants, key):
    text = yaml.safe_load(project["study"].read_text())
    del text["backbones"]
    text["variants"] = variants
    project["study"].write_text(yaml.safe_dump(text))
    with pytest.raises(StudyError) as caught:
        runner.read_study(project["study"])
    assert f"'{key}'" in str(caught.value) and str(project["study"]) in str(caught.value)


def test_variant_parameter_unknown_to_the_notebook_names_the_variant(project):
    text = yaml.safe_load(project["study"].read_text())
    del text["backbones"]
    text["variants"] = {"v": {"kk": 1}}
    project["study"].write_text(yaml.safe_dump(text))
    study = runner.read_study(project["study"])
    with pytest.raises(StudyError, match=r"'variants\.v\.kk' is not a parameter of tiny\.ipynb"):
        runner.check_notebook_parameters(study, runner.expand_grid(study))


def test_cell_names_must_be_unique(project):
    path = _write_study(
        project["study"], backbones=["b-c"], datasets={"a": {"dataset": "dagm"}, "a-b": {"dataset": "dagm"}}
    )
    runner.read_study(path)  # a-b-c and a-b-b-c: distinct
    path = _write_study(
        project["study"], backbones=["c", "b-c"], datasets={"a": {"dataset": "dagm"}, "a-b": {"dataset": "dagm"}}
    )
    with pytest.raises(StudyError, match="'a-b-c' twice"):
        runner.read_study(path)


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
    params, reason = runner.resolve_parameters(
        {"reports": "{reports}"}, data=None, synthetic=synthetic, reports=tmp_path / "reports"
    )
    assert reason is None and params["reports"] == str(tmp_path / "reports")
    _, reason = runner.resolve_parameters({"reports": "{reports}"}, data=None, synthetic=synthetic)
    assert "reports folder" in reason
    assert runner.uses_reports({"reports": "{reports}/x"}) and not runner.uses_reports({"root": "{data}"})


def test_reports_hash_follows_the_other_reports_metrics(tmp_path):
    (tmp_path / "01_a").mkdir()
    (tmp_path / "05_own").mkdir()
    metrics = tmp_path / "01_a" / "c.metrics.json"
    metrics.write_text("{}")
    own = tmp_path / "05_own" / "all.metrics.json"
    own.write_text("{}")
    base = runner.reports_hash(tmp_path, exclude=tmp_path / "05_own")
    own.write_text('{"changed": 1}')  # its own report is not its input
    (tmp_path / "01_a" / "c.html").write_text("<html>")  # nor the rendered pages
    assert runner.reports_hash(tmp_path, exclude=tmp_path / "05_own") == base
    metrics.write_text('{"image_auroc": 0.5}')
    changed = runner.reports_hash(tmp_path, exclude=tmp_path / "05_own")
    assert changed != base
    (tmp_path / "01_a" / "d.failed.json").write_text("{}")
    assert runner.reports_hash(tmp_path, exclude=tmp_path / "05_own") != changed


@pytest.mark.parametrize(
    "change, key",
    [
        ({"colour": "red"}, "colour"),
        ({"notebook": "notebooks/missing.ipynb"}, "notebook"),
        ({"datasets": {}}, "datasets"),
        ({"backbones": []}, "backbones"),
        ({"datasets": {"d": {"root": "/x"}}}, "datasets.d"),
        ({"parameters": {"metrics_out": "/tmp/m.json"}}, "parameters.metrics_out"),
        ({"parameters": {"root": "{dat}/x"}}, "parameters.root"),
        ({"headline": "image_auroc"}, "headline"),
    ],
)
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
    run = {
        "dataset": "d",
        "backbone": "b",
        "headline": ["image_auroc"],
        "status": "ok",
        "duration_s": 1.25,
        "title": "T",
    }
    (folder).mkdir()
    (folder / "d-b.metrics.json").write_text(json.dumps({"image_auroc": 0.91234, "synthetic": True, "_run": run}))
    (folder / "d-b.html").write_text("<html></html>")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "search.json").write_text("{}")
    first = runner.write_index(tmp_path).read_text()
    assert runner.write_index(tmp_path).read_text() == first
    assert "0.912" in first and "synthetic, not DAGM" in first and "benchmarks/search.json" in first
    assert "nb/d-b.html" in first and "http" not in first


def test_index_names_the_variant_column(tmp_path):
    for folder, run in [("by_variant", {"variant": "conv", "backbone": ""}), ("by_backbone", {"backbone": "b"})]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "d-x.metrics.json").write_text(
            json.dumps({"_run": {"dataset": "d", "status": "ok", **run}})
        )
    page = runner.write_index(tmp_path).read_text()
    by_backbone, by_variant = page.split("<span class='folder'>by_variant</span>")
    assert "<th>backbone</th>" in by_backbone and "<td>b</td>" in by_backbone
    assert "<th>variant</th>" in by_variant and "<td>conv</td>" in by_variant and "<th>backbone</th>" not in by_variant


# --------------------------------------------------------------------------- with execution


@pytest.mark.slow
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
        assert metrics["_run"]["notebook_sha256"] == runner.io.sha256_file(project["root"] / "notebooks" / "tiny.ipynb")
        code = metrics["_run"]["code"]  # what the index judges staleness by: the modules the kernel loaded
        assert code["rule"] == runner.freshness.RULE and "freshness.py" in code["modules"]
        assert "methods/knn.py" not in code["modules"]  # never loaded by this notebook
        assert metrics["synthetic"] is (name == "synth-tiny")
        page = (out / f"{name}.html").read_text()
        assert "VISIBLE_OUTPUT" in page and f"VISIBLE_OUTPUT {name} notebooks" in page  # cwd = notebook folder
        assert "CODE_SOURCE_MARKER_7431" not in page  # code inputs hidden
        assert "REMOVED_OUTPUT" not in page  # cells tagged remove dropped
        executed = nbformat.read(out / f"{name}.ipynb", as_version=4)
        assert any("CODE_SOURCE_MARKER_7431" in c.source for c in executed.cells)
        assert not any("code_record" in c.source for c in executed.cells)  # the runner's own cell removed
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


@pytest.mark.slow
def test_variants_study_runs_names_cells_by_variant_and_keeps_side_files(project):
    text = yaml.safe_load(project["study"].read_text())
    del text["backbones"]
    text["datasets"] = {"plain": {"dataset": "dagm", "root": "/nowhere/plain"}}
    text["variants"] = {"low": {"x": 0.1, "side": True}, "high-b": {"x": 0.4, "backbone": "b"}}
    project["study"].write_text(yaml.safe_dump(text, sort_keys=False))
    results, lines = _run(project)
    assert list(results) == ["plain-low", "plain-high-b"]
    assert {n: r.status for n, r in results.items()} == {"plain-low": "ok", "plain-high-b": "ok"}
    assert results["plain-low"].variant == "low" and results["plain-high-b"].backbone == "b"
    assert results["plain-high-b"].metrics["image_auroc"] == pytest.approx(0.9)
    assert results["plain-high-b"].metrics["backbone"] == "b" and results["plain-low"].metrics["backbone"] == "tiny"
    out = project["reports"] / "tiny"
    assert json.loads((out / "plain-low.metrics.json").read_text())["_run"]["variant"] == "low"
    assert (out / "plain-low.all_results.csv").read_text() == "path,score\n"  # moved out of the staging folder
    assert not (out / "plain-high-b.all_results.csv").exists() and not list(out.glob(".*"))
    index = (project["reports"] / "index.html").read_text()
    assert "<th>variant</th>" in index and "<td>high-b</td>" in index and "tiny/plain-low.html" in index


@pytest.mark.slow
def test_a_cell_reading_the_reports_reruns_when_they_change(project):
    path = _write_study(project["study"], datasets={"over": {"dataset": "dagm", "root": "{reports}"}})
    other = project["reports"] / "other"
    other.mkdir(parents=True)
    (other / "c.metrics.json").write_text('{"image_auroc": 0.5}')
    results, _ = _run(project)
    assert results["over-tiny"].status == "ok"
    assert results["over-tiny"].metrics["root"] == str(project["reports"].resolve())
    results, _ = _run(project)
    assert results["over-tiny"].status == "unchanged"  # its own new report is not one of its inputs
    (other / "c.metrics.json").write_text('{"image_auroc": 0.6}')
    results, _ = _run(project)
    assert results["over-tiny"].status == "ok"
    assert path.is_file()


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
        f"{n}-tiny.{ext}" for n in ("synth", "plain") for ext in ("html", "ipynb", "metrics.json")
    )


def test_pinned_threads_override_the_jobs_share_and_the_clients_variables(project, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the client's own value: used unless threads pins another
    results, _ = _run(project, force=True, kernel_name="python3", only="plain-tiny", threads=1)
    assert results["plain-tiny"].metrics["threads"] == "1"
    results, _ = _run(project, force=True, kernel_name="python3", only="plain-tiny")
    assert results["plain-tiny"].metrics["threads"] == "3"


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused_before_anything_runs(project, threads):
    with pytest.raises(ParameterError, match="threads must be a whole number >= 1"):
        _run(project, threads=threads)


def test_threads_and_a_scheduler_are_exclusive(project):
    with pytest.raises(ParameterError, match="threads and scheduler are exclusive"):
        _run(project, threads=1, scheduler="tcp://127.0.0.1:1")


def test_shipped_study_files_are_valid():
    studies = sorted((REPO / "studies").glob("*.yaml"))
    assert {p.name for p in studies} >= {"default.yaml", "knn.yaml", "autoencoder_smoke.yaml", "autoencoder.yaml"}
    for path in studies:
        for study in runner.read_studies(path):
            cells = runner.expand_grid(study)
            runner.check_notebook_parameters(study, cells)
            assert cells
    # the main job: every method family on the synthetic set; its own cells named apart from the full
    # studies' cells, kNN and clustering the full studies' own synthetic cells (the same computation)
    default = runner.read_studies(REPO / "studies" / "default.yaml")
    notebooks = [s.notebook.name for s in default]
    assert notebooks == [
        "01_knn_detection.ipynb",
        "02_patchcore.ipynb",
        "03_autoencoder.ipynb",
        "04_anomaly_clustering.ipynb",
        "05_comparison.ipynb",
    ]
    assert [s.path.name for s in default] == [
        "knn.yaml",
        "patchcore_quick.yaml",
        "autoencoder_quick.yaml",
        "clustering.yaml",
        "comparison.yaml",
    ]
    assert [c.name for s in (default[0], default[3]) for c in runner.expand_grid(s)] == [
        "synthetic_dagm-efficientnet_lite0",
        "synthetic_dagm-efficientnet_lite0",
    ]
    names = {c.name for s in default[1:3] for c in runner.expand_grid(s)}
    assert all(name.startswith("synthetic_quick-") for name in names)
    full = {
        c.name
        for f in ("knn", "patchcore", "autoencoder", "clustering")
        for c in runner.expand_grid(runner.read_study(REPO / "studies" / f"{f}.yaml"))
    }
    assert not names & full
    knn = runner.expand_grid(runner.read_study(REPO / "studies" / "knn.yaml"))
    assert len(knn) == 16 and {c.backbone for c in knn} == {"efficientnet_lite0", "dinov2_vits14"}
    smoke = runner.expand_grid(runner.read_study(REPO / "studies" / "autoencoder_smoke.yaml"))
    assert [c.name for c in smoke] == ["synthetic_smoke-conv", "synthetic_smoke-pretrained-efficientnet_lite0"]
    assert smoke[1].parameters["model"] == "pretrained" and smoke[1].parameters["backbone"] == "efficientnet_lite0"
    compare = runner.expand_grid(runner.read_study(REPO / "studies" / "comparison.yaml"))
    assert [(c.name, c.parameters) for c in compare] == [("all-comparison", {"reports": "{reports}"})]
    full = runner.expand_grid(runner.read_study(REPO / "studies" / "autoencoder.yaml"))
    assert len(full) == 12 and {c.variant for c in full} == {"conv", "pretrained-efficientnet_lite0"}
    assert [c.name for c in full if c.parameters.get("ablation_losses")] == [
        "mvtec_ad-bottle-conv",
        "mvtec_ad-bottle-pretrained-efficientnet_lite0",
    ]


# --------------------------------------------------------------------------- suites


def _write_suite(project, parts, name="suite.yaml"):
    path = project["root"] / "studies" / name
    path.write_text(yaml.safe_dump({"title": "Suite", "studies": parts}, sort_keys=False))
    return path


@pytest.mark.slow
def test_suite_runs_its_parts_in_order_into_one_index(project):
    _write_study(
        project["root"] / "studies" / "other.yaml",
        notebook="notebooks/other.ipynb",
        datasets={"synth": {"dataset": "dagm", "root": "{synthetic}", "x": 0.2}},
    )
    _write_notebook(project["root"] / "notebooks" / "other.ipynb")
    inline = {  # its own data set key: tiny.yaml's synth-tiny report has other parameters (x 0.1)
        "notebook": "notebooks/tiny.ipynb",
        "backbones": ["tiny"],
        "datasets": {"inline": {"dataset": "dagm", "root": "{synthetic}"}},
    }
    suite = _write_suite(project, ["other.yaml", inline])
    studies = runner.read_studies(suite)
    assert [s.notebook.name for s in studies] == ["other.ipynb", "tiny.ipynb"]
    with pytest.raises(StudyError, match="suite of studies"):
        runner.read_study(suite)
    lines = []
    results = runner.run_study(suite, reports_dir=project["reports"], log=lines.append)
    assert [(r.name, r.status) for r in results] == [("synth-tiny", "ok"), ("inline-tiny", "ok")]
    assert results[0].metrics["image_auroc"] == pytest.approx(0.7) and results[1].metrics["image_auroc"] == 0.5
    assert (project["reports"] / "other" / "synth-tiny.html").is_file()
    assert (project["reports"] / "tiny" / "inline-tiny.html").is_file()
    assert lines[0].startswith("study ") and "other.ipynb" in lines[0]
    index = (project["reports"] / "index.html").read_text()
    assert "other" in index and "tiny" in index
    # --only applies across the parts; a pattern that matches no part's cell is refused
    again = runner.run_study(suite, reports_dir=project["reports"], only="*-tiny", log=lambda line: None)
    assert [r.status for r in again] == ["unchanged", "unchanged"]
    assert [r.notebook for r in again] == ["other", "tiny"]
    one = runner.run_study(suite, reports_dir=project["reports"], only="tiny/inline-*", log=lambda line: None)
    assert [(r.notebook, r.name) for r in one] == [("tiny", "inline-tiny")]
    with pytest.raises(StudyError, match="matches no cell"):
        runner.run_study(suite, reports_dir=project["reports"], only="nope", log=lambda line: None)


@pytest.mark.parametrize(
    "parts, message",
    [
        ([], "non-empty list"),
        (["missing.yaml"], "missing.yaml, which is not found"),
        ([3], "must be a study file path or a study mapping"),
        ([{"notebook": "notebooks/tiny.ipynb", "backbones": ["tiny"]}], r"studies\[0\]: key 'datasets'"),
        (["tiny.yaml", "tiny.yaml"], "give the report tiny/synth-tiny"),
    ],
)
def test_bad_suites_are_refused_naming_the_part(project, parts, message):
    suite = _write_suite(project, parts)
    with pytest.raises(StudyError, match=message):
        runner.read_studies(suite)


def test_suite_refuses_study_keys_and_nested_suites(project):
    path = project["root"] / "studies" / "mixed.yaml"
    path.write_text(yaml.safe_dump({"studies": ["tiny.yaml"], "backbones": ["tiny"]}))
    with pytest.raises(StudyError, match="'backbones' is not a suite key"):
        runner.read_studies(path)
    inner = _write_suite(project, ["tiny.yaml"], name="inner.yaml")
    outer = _write_suite(project, [inner.name], name="outer.yaml")
    with pytest.raises(StudyError, match="a suite's parts must be studies"):
        runner.read_studies(outer)


@pytest.mark.slow
def test_a_half_replaced_report_is_rerun(project):
    """A run killed (or a disk full) between the renames of a report's files leaves files that do not
    match its metrics: the next run redoes the cell instead of calling it unchanged."""
    out = project["reports"] / "tiny"
    _run(project, only="plain-tiny")
    recorded = json.loads((out / "plain-tiny.metrics.json").read_text())["_run"]["files"]
    assert sorted(recorded) == ["plain-tiny.html", "plain-tiny.ipynb"]
    assert all(runner.io.sha256_file(out / name) == digest for name, digest in recorded.items())
    results, _ = _run(project, only="plain-tiny")
    assert results["plain-tiny"].status == "unchanged"
    notebook = out / "plain-tiny.ipynb"
    notebook.write_bytes(notebook.read_bytes().replace(b"VISIBLE_OUTPUT", b"A_NEWER_RUN'S_OUTPUT"))
    results, _ = _run(project, only="plain-tiny")
    assert results["plain-tiny"].status == "ok"  # rerun: the report is whole again
    assert b"A_NEWER_RUN" not in notebook.read_bytes()
    (out / "plain-tiny.html").unlink()
    results, _ = _run(project, only="plain-tiny")
    assert results["plain-tiny"].status == "ok"


@pytest.mark.slow
def test_a_second_run_on_one_reports_folder_is_refused_naming_the_first(project):
    from conftest import hold_lock

    child = hold_lock(runner.reports_lock(project["reports"]))
    try:
        with pytest.raises(StudyError, match=rf"the reports folder .* is in use by process {child.pid}"):
            _run(project)
        assert not (project["reports"] / "tiny").exists()  # nothing written
    finally:
        child.kill()
        child.wait()
    results, _ = _run(project)  # the holder is gone: the lock went with it
    assert results["synth-tiny"].status == "ok"


def test_a_study_that_cannot_run_is_refused_whole_before_any_kernel_starts(tmp_path, capsys):
    from conftest import REPO

    data = tmp_path / "data"
    (data / "mvtec_ad" / "bottle").mkdir(parents=True)
    study = tmp_path / "studies" / "broken.yaml"
    study.parent.mkdir()
    study.write_text(
        yaml.safe_dump(
            {
                "notebook": str(REPO / "notebooks" / "01_knn_detection.ipynb"),
                "title": "broken",
                "parameters": {"k": "ten"},
                "backbones": ["efficientnet_lite0", "no_such_net"],
                "datasets": {
                    "bottle": {"dataset": "mvtec_ad", "root": "{data}/mvtec_ad", "category": "bottle"},
                    "cable": {"dataset": "mvtec_ad", "root": "{data}/mvtec_ad", "category": "cable"},
                    "tire": {"dataset": "mvtec_3d", "root": "{data}/mvtec_3d", "category": "tire"},
                },
            }
        )
    )
    reports = tmp_path / "reports"
    with pytest.raises(StudyError) as refused:
        runner.run_study(study, reports_dir=reports, data_root=data, log=lambda line: None)
    message = str(refused.value)
    assert "cannot run" in message and "nothing was run or written" in message
    assert "k='ten' is a str, but 01_knn_detection.ipynb declares k: int" in message
    assert "backbone 'no_such_net' is not registered" in message
    assert "category 'cable' is not a folder of" in message and "mvtec_3d (root {data}/mvtec_3d" in message
    assert not reports.exists()  # nothing written
    from anomalib_study.cli import main

    code = main(["run", str(study), "--data", str(tmp_path / "no_such_data"), "--reports", str(reports)])
    err = capsys.readouterr().err
    assert code == 2 and f"--data {tmp_path / 'no_such_data'} is not a folder" in err and "Traceback" not in err
    assert not reports.exists()


# --------------------------------------------------------------------------- one cell per distinct computation


def _other_study(project, name, datasets, **overrides):
    return _write_study(project["root"] / "studies" / name, datasets=datasets, **overrides)


def test_a_duplicate_across_two_files_is_found_and_named(project):
    one = _other_study(project, "a.yaml", {"one": {"dataset": "dagm", "root": "/d", "x": 0.2}})
    two = _other_study(project, "b.yaml", {"two": {"dataset": "dagm", "root": "/d"}}, parameters={"x": 0.2})
    problems = study_duplicates.duplicate_cells([one, two])
    assert len(problems) == 1 and "\n" not in problems[0]
    assert problems[0].startswith(f"{one} cell one-tiny and {two} cell two-tiny are the same computation (tiny.ipynb")
    assert "data dataset 'dagm', root '/d', category None" in problems[0]
    assert f"drop two-tiny from {two} and list it there as uses: {{a.yaml: [one-tiny]}}" in problems[0]


def test_a_parameter_given_at_its_default_counts_as_the_same(project):
    given = {"dataset": "dagm", "root": "/d", "category": None, "device": "cpu", "x": 0}  # x: 0 == the default 0.0
    one = _other_study(project, "a.yaml", {"one": given}, parameters={})
    two = _other_study(project, "b.yaml", {"two": {"dataset": "dagm", "root": "/d"}}, parameters={})
    problems = study_duplicates.duplicate_cells([one, two])
    assert len(problems) == 1 and "category, device, x given in one of them at the notebook's default" in problems[0]
    assert studies.notebook_defaults(project["root"] / "notebooks" / "tiny.ipynb")["x"] == 0.0


def test_different_data_or_parameters_are_not_a_duplicate(project):
    base = {"dataset": "dagm", "root": "/d"}
    one = _other_study(project, "a.yaml", {"one": base})
    others = {
        "root": {**base, "root": "/e"},
        "category": {**base, "category": "Class2"},
        "layout": {**base, "dataset": "mvtec_ad"},
        "x": {**base, "x": 0.3},
    }
    two = _other_study(project, "b.yaml", others)
    assert study_duplicates.duplicate_cells([one, two]) == []


def test_two_cells_writing_one_report_with_other_parameters_are_named(project):
    two = _other_study(project, "b.yaml", {"synth": {"dataset": "dagm", "root": "{synthetic}"}}, parameters={"x": 0.4})
    problems = study_duplicates.duplicate_cells([project["study"], two])
    assert problems == [
        f"{project['study']} cell synth-tiny and {two} cell synth-tiny write the same report "
        "reports/tiny/synth-tiny.* with different parameters (x 0.1 vs 0.4): whichever runs last replaces the "
        "other; rename the dataset key in one of them"
    ]
    assert study_duplicates.duplicate_cells([two], involving=[project["study"]]) == []


def test_a_cell_counts_once_where_it_is_defined(project):
    """A suite part naming a study file (or some of its cells) and a study's ``uses`` run or list that
    file's cells: no duplicate. An inline part repeating one is, and the fix names the part form."""
    whole = _write_suite(project, ["tiny.yaml"], name="whole.yaml")
    some = _write_suite(project, [{"study": "tiny.yaml", "only": ["plain-*"]}], name="some.yaml")
    assert [c.name for s in runner.read_studies(some) for c in runner.expand_grid(s)] == ["plain-tiny"]
    user = _other_study(
        project, "user.yaml", {"mine": {"dataset": "dagm", "root": "/mine"}}, uses={"tiny.yaml": ["plain-tiny"]}
    )
    part = _write_suite(project, [{"study": "user.yaml", "only": ["mine-*"]}], name="part.yaml")
    assert [(s.path.name, s.uses) for s in runner.read_studies(part)] == [("user.yaml", ())]  # its cells only
    assert study_duplicates.duplicate_cells([project["study"], whole, some, user]) == []
    inline = {
        "notebook": "notebooks/tiny.ipynb",
        "parameters": {"x": 0.3},
        "backbones": ["tiny"],
        "datasets": {"again": {"dataset": "dagm", "root": "/nowhere/plain"}},
    }
    suite = _write_suite(project, [inline], name="inline.yaml")
    (problem,) = study_duplicates.duplicate_cells([suite, project["study"]])
    assert problem.startswith(f"{project['study']} cell plain-tiny and {suite} cell again-tiny are the same")
    assert problem.endswith("make that part {study: tiny.yaml, only: [plain-tiny]}")
    with pytest.raises(StudyError, match=r"studies\[0\]: 'only' 'nope' matches no cell"):
        runner.read_studies(_write_suite(project, [{"study": "tiny.yaml", "only": ["nope"]}], name="bad.yaml"))


def test_uses_names_cells_another_study_file_defines(project):
    user = _other_study(
        project, "user.yaml", {"mine": {"dataset": "dagm", "root": "/mine"}}, uses={"tiny.yaml": ["plain-tiny"]}
    )
    study = runner.read_study(user)
    assert [c.name for c in runner.expand_grid(study)] == ["mine-tiny"]  # a used cell is not in the grid
    assert [(s.path.name, c.name, c.parameters["x"]) for s, c in studies.used_cells(study)] == [
        ("tiny.yaml", "plain-tiny", 0.3)
    ]
    _write_suite(project, ["tiny.yaml"], name="suite.yaml")
    cases = [
        ({"tiny.yaml": ["nope-tiny"]}, "does not define it (its cells: synth-tiny, plain-tiny, real-tiny)"),
        ({"gone.yaml": ["plain-tiny"]}, "uses.gone.yaml' names a study file that is not found"),
        ({"user.yaml": ["plain-tiny"]}, "user.yaml only uses it: name tiny.yaml, which defines it"),
        ({"suite.yaml": ["synth-tiny"]}, "names a suite: name the study file that defines the cell"),
        (["tiny.yaml"], "key 'uses' must be a mapping of study file -> [cell names]"),
        ({"tiny.yaml": []}, "must be a non-empty list of the cell names"),
    ]
    for uses, message in cases:
        path = _other_study(project, "bad.yaml", {"own": {"dataset": "dagm"}}, uses=uses)
        with pytest.raises(StudyError, match=re.escape(message)):
            runner.read_studies(path)
    path = _other_study(project, "bad.yaml", {"plain": {"dataset": "dagm"}}, uses={"tiny.yaml": ["plain-tiny"]})
    with pytest.raises(StudyError, match="which is also one of this study's own cells"):
        runner.read_study(path)


def test_run_refuses_a_duplicate_computation_before_any_kernel_starts(project, capsys):
    copy = _other_study(project, "copy.yaml", {"again": {"dataset": "dagm", "root": "/nowhere/plain", "x": 0.3}})
    for study in (project["study"], copy):  # either of the two
        with pytest.raises(StudyError) as refused:
            runner.run_study(study, reports_dir=project["reports"], log=lambda line: None)
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"study {study} cannot run (nothing was run or written): ")
        # in the order of the files' names, whichever of the two runs
        assert f"{copy} cell again-tiny and {project['study']} cell plain-tiny are the same computation" in message
        assert f"drop plain-tiny from {project['study']} and list it there as uses: {{copy.yaml: [again-tiny]}}" in (
            message
        )
    assert not project["reports"].exists() and project["synthetic_calls"] == []
    from anomalib_study.cli import main

    assert main(["run", str(copy), "--reports", str(project["reports"])]) == 2
    err = capsys.readouterr().err
    assert "again-tiny and " in err and "are the same computation" in err and "Traceback" not in err
    copy.write_text("{not: valid")  # a sibling that cannot be read is not this study's problem
    assert runner.duplicate_cells([copy], skip_unreadable=True) == []


def test_a_referring_study_lists_the_cell_and_never_runs_it(project):
    reports, out = project["reports"], project["reports"] / "tiny"
    user = _other_study(
        project,
        "user.yaml",
        {"mine": {"dataset": "dagm", "root": "/mine", "x": 0.2}},
        uses={"tiny.yaml": ["plain-tiny"]},
    )
    lines = []
    (missing,) = runner.run_study(user, reports_dir=reports, only="plain-*", log=lines.append)
    assert missing.status == "skipped" and missing.defined_by == str(project["study"])
    assert missing.message.startswith(f"missing; used by {user}, defined by {project['study']}: run ")
    assert f"`anomalib-study run {project['study']} --only 'plain-tiny'`" in missing.message
    assert not (out / "plain-tiny.metrics.json").exists()  # not run
    assert "skipped in the last run: missing; used by" in (reports / "index.html").read_text()

    assert [r.status for r in runner.run_study(project["study"], reports_dir=reports, only="plain-tiny")] == ["ok"]
    before = (out / "plain-tiny.metrics.json").read_bytes()
    lines = []
    (listed,) = runner.run_study(user, reports_dir=reports, only="plain-tiny", force=True, log=lines.append)
    assert listed.status == "unchanged" and listed.defined_by == str(project["study"])
    assert listed.notebook == "tiny" and listed.metrics["image_auroc"] == pytest.approx(0.8)
    assert (out / "plain-tiny.metrics.json").read_bytes() == before  # --force reruns own cells, never used ones
    assert any(f"plain-tiny: defined by {project['study']}, current, not run here" in line for line in lines)
    assert "(+ 1 used, defined by other studies)" in lines[0]

    study = yaml.safe_load(project["study"].read_text())
    study["datasets"]["plain"]["x"] = 0.5  # its defining study changed it: the report is stale until rerun there
    project["study"].write_text(yaml.safe_dump(study))
    (stale,) = runner.run_study(user, reports_dir=reports, only="plain-tiny", log=lambda line: None)
    assert stale.status == "skipped" and stale.message.startswith("stale; used by")
    assert (out / "plain-tiny.metrics.json").read_bytes() == before


def test_the_committed_study_files_define_each_computation_once():
    files = sorted((REPO / "studies").glob("*.yaml"))
    assert study_duplicates.duplicate_cells(files) == []
    used = {
        (path.name, other.path.name, cell.name)
        for path in files
        for study in runner.read_studies(path)
        for other, cell in studies.used_cells(study)
    }
    assert ("patchcore.yaml", "patchcore_resolution.yaml", "magnetic_tile-dinov2_vits14-448-keep") in used
    assert ("patchcore.yaml", "patchcore_keep_coreset.yaml", "magnetic_tile-448-keep-coreset10") in used
    assert ("patchcore_keep_coreset.yaml", "patchcore_resolution.yaml", "magnetic_tile-dinov2_vits14-448-keep") in used
