"""Every notebook under notebooks/ is stored clean: no outputs, no execution counts, and
exactly one code cell tagged ``parameters`` that papermill can read line by line."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from anomalib_study.runner import notebook_parameters

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _ids() -> list[str]:
    return [p.relative_to(NOTEBOOKS).as_posix() for p in _notebooks()]


def test_there_are_notebooks():
    assert _notebooks(), f"no notebook found under {NOTEBOOKS}"


@pytest.mark.parametrize("path", _notebooks(), ids=_ids())
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} have outputs or execution counts; clear them "
        "(jupyter nbconvert --clear-output --inplace) before committing"
    )


@pytest.mark.parametrize("path", _notebooks(), ids=_ids())
def test_notebook_has_exactly_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: cells tagged 'parameters': {tagged}; papermill needs exactly one"
    assert nb.cells[tagged[0]].cell_type == "code", f"{path.name}: the 'parameters' cell must be a code cell"
    names = notebook_parameters(path)
    # every notebook takes what the runner sets; one that reads a data set also takes its location and backbone
    required = ("metrics_out", "report_name") + (
        ("root", "category", "backbone", "device") if "dataset" in names else ()
    )
    for name in required:
        assert name in names, f"{path.name}: the parameters cell must declare '{name}' (the runner or a study sets it)"


@pytest.mark.parametrize("path", _notebooks(), ids=_ids())
def test_papermill_reads_every_parameter(path):
    """`papermill --help-notebook` shows each parameter with its comment; its line parser skips
    lines it cannot read (e.g. a comment containing '='), so the help would miss them."""
    import papermill

    readable = set(papermill.inspect_notebook(str(path)))
    missing = [name for name in notebook_parameters(path) if name not in readable]
    assert not missing, (
        f"{path.name}: papermill cannot read the parameter line(s) of {missing}: "
        "keep each to `name = value  # comment` with no '=' in the comment"
    )


@pytest.mark.parametrize("path", _notebooks(), ids=_ids())
def test_every_parameter_has_a_type_and_a_comment(path):
    """`papermill --help-notebook` shows each parameter's type (from `name: type = value`) and
    its comment; an untyped line shows "Unknown type"."""
    import papermill

    inferred = papermill.inspect_notebook(str(path))
    untyped = [name for name, p in inferred.items() if p["inferred_type_name"] in (None, "None")]
    uncommented = [name for name, p in inferred.items() if not (p["help"] or "").strip()]
    assert not untyped, f"{path.name}: parameters without a type: {untyped}; write `name: type = value  # comment`"
    assert not uncommented, f"{path.name}: parameters without a comment: {uncommented}; add `# what it is`"
