"""The architecture holds: data flows one way (no module imports a higher layer), and the
public API is importable from the top level without loading torch."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGE = REPO / "anomalib_study"

#: layer of each module (prefix match, longest first): a module may import its own layer or lower ones
LAYERS = {
    "anomalib_study": 0,  # the package itself: only __version__ is imported from it
    "anomalib_study.errors": 0,
    "anomalib_study.checks": 0,
    "anomalib_study.io": 0,
    "anomalib_study.profiling": 0,
    "anomalib_study.published": 0,
    "anomalib_study.hardware": 0,
    "anomalib_study.provenance": 0,
    "anomalib_study.freshness": 0,
    "anomalib_study.schema": 0,
    "anomalib_study.data": 1,
    "anomalib_study.preprocessing": 1,
    "anomalib_study.weights": 2,
    "anomalib_study.backbone_families": 2,
    "anomalib_study.backbone_models": 2,
    "anomalib_study.backbones": 2,
    "anomalib_study.features": 3,
    "anomalib_study.patches": 3,
    "anomalib_study.patch_cache": 3,
    "anomalib_study.search": 4,
    "anomalib_study.methods": 5,
    "anomalib_study.metrics": 6,
    "anomalib_study.plots": 6,
    "anomalib_study.study_plots": 6,
    "anomalib_study.evaluate": 7,
    "anomalib_study.evaluate_detection": 7,
    "anomalib_study.evaluate_clustering": 7,
    "anomalib_study.notebook": 7,
    "anomalib_study.detect": 7,
    "anomalib_study.detect_db": 7,
    "anomalib_study.overlays": 7,
    "anomalib_study.cluster": 7,
    "anomalib_study.cluster_run": 7,
    "anomalib_study.cluster_page": 7,
    "anomalib_study.comparison": 7,
    "anomalib_study.findings": 7,
    "anomalib_study.seed_tables": 7,
    "anomalib_study.ablations": 7,
    "anomalib_study.findings_html": 7,
    "anomalib_study.frontpage": 7,
    "anomalib_study.studies": 8,
    "anomalib_study.study_duplicates": 8,
    "anomalib_study.execution": 8,
    "anomalib_study.dask_cluster": 8,
    "anomalib_study.report_files": 8,
    "anomalib_study.runner": 8,
    "anomalib_study.verify_compare": 9,
    "anomalib_study.verify": 9,
    "anomalib_study.cli": 10,
}


def _layer(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer in LAYERS: add it")


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path) -> set[str]:
    """Every anomalib_study module ``path`` imports, at the top or inside functions."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "anomalib_study" and name != module}


def _offences(module: str, imported: set[str]) -> list[str]:
    return [
        f"{module} (layer {_layer(module)}) imports {name} (layer {_layer(name)})"
        for name in sorted(imported)
        if _layer(name) > _layer(module)
    ]


def test_no_module_imports_a_higher_layer():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if module != "anomalib_study":  # the lazy public API names every layer on purpose
            offences += _offences(module, _imports(path))
    assert not offences, "\n".join(offences)


def test_the_layer_check_flags_an_upward_import():
    assert _offences("anomalib_study.search", {"anomalib_study.methods.base", "anomalib_study.errors"}) == [
        "anomalib_study.search (layer 4) imports anomalib_study.methods.base (layer 5)"
    ]
    assert _offences("anomalib_study.methods.knn", {"anomalib_study.search", "anomalib_study.features"}) == []


def test_public_api_from_the_top_level():
    import anomalib_study
    import anomalib_study.evaluate  # the submodule shares the function's name: both must stay callable
    from anomalib_study import KNNDetector, PatchCore, detect_abnormal, evaluate, load_backbone

    assert {"detect_abnormal", "evaluate", "load_backbone", "KNNDetector", "PatchCore"} <= set(anomalib_study.__all__)
    assert callable(detect_abnormal) and callable(evaluate) and callable(load_backbone)
    assert KNNDetector.__name__ == "KNNDetector" and PatchCore.__name__ == "PatchCore"
    for name in anomalib_study.__all__:
        assert getattr(anomalib_study, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'frobnicate'"):
        anomalib_study.frobnicate


def test_import_is_lazy_and_fast():
    code = (
        "import sys, anomalib_study; "
        "print(sorted(m for m in ('torch', 'faiss', 'anomalib_study.detect') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_search_layer_imports_no_method():
    code = "import sys, anomalib_study.search; print(any(m.startswith('anomalib_study.methods') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
