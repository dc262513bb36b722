"""A report is stale exactly when code it ran changed: module hashes on the syntax tree
without docstrings, recorded per report, judged by the front page and the runner alike."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from anomalib_study import freshness
from conftest import REPO

MODULE = '''"""A module."""

import math


def area(r):
    """The area."""
    # a comment
    return math.pi * r ** 2
'''


def test_docstrings_comments_and_layout_leave_the_hash_a_statement_changes_it():
    base = freshness.source_hash(MODULE)
    assert freshness.source_hash(MODULE.replace('"""The area."""', '"""The area of a disc of radius r."""')) == base
    assert freshness.source_hash(MODULE.replace("# a comment", "# another comment\n\n")) == base
    assert freshness.source_hash(MODULE.replace("math.pi * r ** 2", "(math.pi * r**2)")) == base
    assert freshness.source_hash(MODULE.replace('    """The area."""\n', "")) == base  # docstring removed
    assert freshness.source_hash(MODULE.replace("r ** 2", "r ** 3")) != base
    assert freshness.source_hash(MODULE.replace("def area(r)", "def area(r, s=1)")) != base
    assert freshness.source_hash("def broken(:\n").startswith("bytes:")  # never raises


def test_a_code_version_moves_with_a_statement_of_a_named_module_only(tmp_path):
    for name in ("a.py", "b.py", "c.py"):
        (tmp_path / name).write_text(MODULE)
    base = freshness.code_version(["a.py", "b.py"], package_root=tmp_path)
    assert len(base) == 16 and freshness.code_version(["a.py", "b.py"], package_root=tmp_path) == base
    assert freshness.code_version(["b.py", "a.py"], package_root=tmp_path) != base  # the names are part of it
    (tmp_path / "c.py").write_text(MODULE.replace("r ** 2", "r ** 3"))  # not named: no effect
    (tmp_path / "a.py").write_text(MODULE.replace('"""The area."""', '"""The area of a disc."""'))
    assert freshness.code_version(["a.py", "b.py"], package_root=tmp_path) == base
    (tmp_path / "b.py").write_text(MODULE.replace("r ** 2", "r ** 3"))
    assert freshness.code_version(["a.py", "b.py"], package_root=tmp_path) != base
    assert freshness.code_version(["a.py", "gone.py"], package_root=tmp_path) != base
    with_libraries = freshness.code_version(["a.py", "b.py"], package_root=tmp_path, libraries=True)
    assert with_libraries != freshness.code_version(["a.py", "b.py"], package_root=tmp_path)
    versions = freshness.library_versions()
    assert set(versions) == set(freshness.FEATURE_LIBRARIES) and versions["torch"]
    assert freshness.library_versions(["no-such-distribution"]) == {"no-such-distribution": None}


def test_an_upgraded_library_moves_the_code_version(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text(MODULE)
    base = freshness.code_version(["a.py"], package_root=tmp_path, libraries=True)
    real = freshness.library_versions()
    monkeypatch.setattr(freshness, "library_versions", lambda: {**real, "torch": "99.0"})
    assert freshness.code_version(["a.py"], package_root=tmp_path, libraries=True) != base


def test_a_record_names_the_loaded_modules_and_what_changed_since(tmp_path):
    root = tmp_path / "anomalib_study"
    (root / "methods").mkdir(parents=True)
    for name in ("__init__.py", "methods/__init__.py", "methods/a.py", "methods/b.py"):
        (root / name).write_text(MODULE)

    class Loaded:
        def __init__(self, file):
            self.__file__ = str(file)

    modules = {
        "anomalib_study": Loaded(root / "__init__.py"),
        "anomalib_study.methods.a": Loaded(root / "methods/a.py"),
        "anomalib_study.methods": Loaded(root / "methods/__init__.py"),
        "numpy": Loaded(tmp_path / "numpy.py"),
        "anomalib_study.elsewhere": Loaded(tmp_path / "other" / "x.py"),
    }
    record = freshness.code_record(modules, package_root=root)
    assert record["rule"] == freshness.RULE
    assert list(record["modules"]) == ["__init__.py", "methods/__init__.py", "methods/a.py"]  # b never loaded
    assert freshness.changed_modules(record, root) == []

    (root / "methods/a.py").write_text(MODULE.replace("# a comment", "# edited"))
    (root / "methods/b.py").write_text(MODULE + "\nx = 1\n")  # not loaded: does not count
    assert freshness.changed_modules(record, root) == []
    (root / "methods/a.py").write_text(MODULE.replace("r ** 2", "r * r"))
    assert freshness.changed_modules(record, root) == ["methods/a.py"]
    (root / "methods/__init__.py").unlink()
    assert freshness.changed_modules(record, root) == ["methods/__init__.py", "methods/a.py"]
    assert freshness.describe_changes(["methods/a.py"]) == "anomalib_study/methods/a.py changed"
    assert freshness.changed_modules({"rule": "another", "modules": {}}, root) is None
    assert freshness.changed_modules(None, root) is None

    freshness.write_code_record(tmp_path / "record.json")
    assert freshness.read_code_record(tmp_path / "record.json")["rule"] == freshness.RULE
    assert freshness.read_code_record(tmp_path / "missing.json") is None


# the package modules each method notebook's kernel loads: its own imports, then its method
# (as evaluate loads it through the registry); the comparison loads no method
_NOTEBOOK_METHODS = {
    "01_knn_detection": "knn",
    "02_patchcore": "patchcore",
    "03_autoencoder": "autoencoder",
    "04_anomaly_clustering": "clustering",
    "05_comparison": None,
}

_RECORD = textwrap.dedent("""
    import json, sys
    notebook, method = sys.argv[1], sys.argv[2]
    for cell in json.load(open(notebook))["cells"]:
        if cell["cell_type"] == "code":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith(("from anomalib_study", "import anomalib_study")):
                    exec(line)
    if method != "-":
        from anomalib_study.methods import get_method
        get_method(method)
    from anomalib_study import freshness
    print(json.dumps(freshness.code_record()))
""")

_JUDGE = textwrap.dedent("""
    import json, sys
    from anomalib_study import comparison
    table = comparison.collect_reports(sys.argv[1], notebooks_dir=sys.argv[2])
    print(json.dumps(sorted(table.loc[table["freshness"] == "stale", "notebook"].tolist())))
""")


def _python(copy, code, *args):
    env = {**os.environ, "PYTHONPATH": str(copy)}
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True, timeout=300, cwd=copy
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_docstring_edit_stales_nothing_a_change_the_knn_notebook_runs_stales_exactly_the_knn_reports(tmp_path):
    """On a copy of the package: one report per notebook, each recording the modules its
    notebook loads; the front page's rule judges them after each edit."""
    copy = tmp_path / "project"
    shutil.copytree(REPO / "anomalib_study", copy / "anomalib_study", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "notebooks", copy / "notebooks")
    reports = copy / "reports"
    for notebook, method in _NOTEBOOK_METHODS.items():
        source = copy / "notebooks" / f"{notebook}.ipynb"
        record = _python(copy, _RECORD, source, method or "-")
        assert (
            (f"methods/{method}.py" in record["modules"])
            if method
            else not any(name in record["modules"] for name in ("methods/knn.py", "methods/patchcore.py"))
        )
        others = [m for m in ("knn", "patchcore", "autoencoder", "clustering") if m != method]
        assert not any(f"methods/{m}.py" in record["modules"] for m in others), (notebook, record["modules"])
        run = {"status": "ok", "notebook_sha256": freshness.io.sha256_file(source), "code": record}
        folder = reports / notebook
        folder.mkdir(parents=True)
        (folder / "cell.metrics.json").write_text(json.dumps({"_run": run}))  # a notebook's own layout
    notebooks = copy / "notebooks"
    assert _python(copy, _JUDGE, reports, notebooks) == []

    patchcore = copy / "anomalib_study" / "methods" / "patchcore.py"
    text = patchcore.read_text()
    first = text.index('"""') + 3
    patchcore.write_text(text[:first] + "Edited: only the docstring. " + text[first:])
    assert _python(copy, _JUDGE, reports, notebooks) == []  # a docstring edit stales nothing

    knn = copy / "anomalib_study" / "methods" / "knn.py"
    text = knn.read_text()
    assert "def _l2_normalise(X: np.ndarray) -> np.ndarray:\n" in text
    knn.write_text(
        text.replace(
            "def _l2_normalise(X: np.ndarray) -> np.ndarray:\n",
            "def _l2_normalise(X: np.ndarray) -> np.ndarray:\n    X = X + 0\n",
        )
    )
    assert _python(copy, _JUDGE, reports, notebooks) == ["01_knn_detection"]
