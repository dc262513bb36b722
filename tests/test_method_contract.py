"""One contract over the method registry: every registered method declares each parameter
once, and that declaration is its constructor, its ``get_params``, its command-line flags
and its notebook's defaults. A method defined in this file alone plugs in through
``evaluate``, ``detect``, the command line and the comparison table."""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil

import numpy as np
import pytest

from anomalib_study import comparison, methods
from anomalib_study.checks import check_fraction, open_fraction
from anomalib_study.cli import main
from anomalib_study.data.synthetic import make_synthetic_dagm
from anomalib_study.errors import ParameterError
from anomalib_study.methods.base import (
    BaseDetector,
    Method,
    Param,
    check_embeddings,
    check_is_fitted,
    load_model_file,
    save_model_file,
)
from conftest import REPO


def _notebook_defaults(notebook: str) -> dict:
    cells = json.loads((REPO / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    values = {}
    for node in ast.parse(source).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and getattr(node, "value", None) is not None:
            try:
                values[target.id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


@pytest.mark.parametrize("name", list(methods.REGISTRY))
def test_every_method_declares_each_parameter_once(name):
    entry, spec = methods.REGISTRY[name], methods.get_method(name)
    assert (spec.name, spec.task) == (entry.name, entry.task)
    estimator = spec.estimator
    declared = estimator.declared_params()
    assert declared, f"{name}: no Param declarations"
    signature = inspect.signature(estimator)
    assert list(signature.parameters) == list(declared)  # the constructor is the declaration
    assert {k: p.default for k, p in signature.parameters.items()} == {k: p.default for k, p in declared.items()}
    model = estimator()
    assert model.get_params() == {k: p.default for k, p in declared.items()}
    model._validate_params()  # the defaults are valid
    offered = [p.name for p in declared.values() if p.kind == "model" and p.offered]
    assert [p.name for p in spec.params if p not in spec.extra_params] == offered  # the command line's parameters
    assert spec.resolve_params({}) == {
        **{p.name: p.default for p in spec.extra_params},
        **{k: declared[k].default for k in offered},
    }
    for param in declared.values():
        assert param.help and "\n" not in param.help, f"{name}.{param.name}: one line of help"
        assert f"        {param.name} ({param.kind}, default" in estimator.__doc__  # the docstring lists it
    if "batch_size" in declared:
        assert spec.batch_size == declared["batch_size"].default
    if spec.quick_params:
        spec.check_params(spec.resolve_params(dict(spec.quick_params)))


@pytest.mark.parametrize("name", [n for n, e in methods.REGISTRY.items() if e.notebook])
def test_the_notebook_parameters_agree_with_the_declaration(name):
    spec = methods.get_method(name)
    declared = spec.estimator.declared_params()
    notebook = _notebook_defaults(methods.REGISTRY[name].notebook)
    shared = sorted(set(notebook) & set(declared))
    assert shared, "the notebook names none of the method's parameters"
    differ = {k: (notebook[k], declared[k].default) for k in shared if notebook[k] != declared[k].default}
    assert not differ, f"notebook default vs declaration: {differ}"
    if "batch_size" in notebook:
        assert notebook["batch_size"] == spec.batch_size


def test_a_declaration_refuses_bad_values_and_unknown_names():
    model = methods.get_method("knn").estimator(k=0)
    with pytest.raises(ParameterError, match="k must be >= 1"):
        model._validate_params()
    with pytest.raises(TypeError, match="unexpected keyword argument 'kk'"):
        methods.get_method("knn").estimator(kk=3)
    with pytest.raises(ParameterError, match="sampler must be one of greedy, random, got 'best'"):
        methods.get_method("patchcore").estimator(sampler="best")._validate_params()
    with pytest.raises(TypeError, match="declares Params and its own __init__"):

        class Both(BaseDetector):
            x = Param(1, "x")

            def __init__(self, x=1):
                self.x = x


def test_reading_the_registry_loads_no_method_and_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from anomalib_study import comparison, methods; "
        "print(methods.method_label('knn'), list(comparison.METHOD_LABELS)); "
        "loaded = [m for m in sys.modules if m.startswith('anomalib_study.methods.') or m == 'torch']; "
        "print(loaded); "
        "assert sorted(loaded) == ['anomalib_study.methods.base', 'anomalib_study.methods.params'], loaded"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- a method from this file alone
class MeanDistance(BaseDetector):
    """An image's score: the distance of its embedding to the mean normal embedding."""

    thres_ratio = Param(
        0.9, "share of normal images the threshold keeps normal", cli=open_fraction, check=check_fraction
    )
    device = Param("cpu", "unused: numpy on the CPU", kind="run")

    def fit(self, X):
        self._validate_params()
        X = check_embeddings(X, "X", min_samples=2)
        self.mean_ = X.mean(axis=0)
        self.train_scores_ = np.linalg.norm(X - self.mean_, axis=1)
        self.threshold_ = float(np.quantile(self.train_scores_, self.thres_ratio))
        return self

    def score(self, X):
        check_is_fitted(self, ["mean_"])
        return np.linalg.norm(check_embeddings(X, "X", n_features=self.mean_.size) - self.mean_, axis=1)

    def save(self, path):
        return save_model_file(
            path,
            "test.mean_distance",
            1,
            {"params": self.get_params(), "threshold_": self.threshold_},
            {"mean_": self.mean_, "train_scores_": self.train_scores_},
        )

    @classmethod
    def load(cls, path, device="cpu"):
        header, arrays = load_model_file(path, "test.mean_distance", 1, required=("mean_", "train_scores_"))
        model = cls(**header["params"])
        model.mean_, model.train_scores_, model.threshold_ = (
            arrays["mean_"],
            arrays["train_scores_"],
            header["threshold_"],
        )
        return model


class MeanDistanceMethod(Method):
    """The method as evaluate, detect, the command line and the reports see it."""

    name, label, estimator = "mean_distance", "mean distance", MeanDistance
    description = "distance of the image embedding to the mean normal embedding"
    quick_params = {"thres_ratio": 0.8}

    def fit_paths(self, backbone, paths, params, run):
        from anomalib_study.features import extract_embeddings

        X = extract_embeddings(backbone, list(paths), batch_size=run.batch_size, device=run.device, progress=False)
        return MeanDistance(**params).fit(X)

    def score_paths(self, model, backbone, paths, run, errors=None):
        from anomalib_study.features import extract_embeddings

        X = extract_embeddings(backbone, list(paths), batch_size=run.batch_size, device=run.device, progress=False)
        return {"image_scores": model.score(X)}

    def describe(self, model):
        return {**model.model_params(), "threshold": model.threshold_, "threshold_rule": "a quantile"}

    def check_loaded(self, model, section, n_images):
        return None

    def n_images(self, model):
        return int(model.train_scores_.size)

    def calibration_scores(self, model):
        return model.train_scores_


SPEC = MeanDistanceMethod()


@pytest.fixture
def registered():
    methods.register(methods.MethodEntry("mean_distance", f"{__name__}:SPEC", "mean distance (test)"), SPEC)
    yield SPEC
    methods.unregister("mean_distance")


@pytest.mark.slow
def test_a_method_from_a_test_file_runs_through_evaluate_detect_the_cli_and_the_comparison(registered, tmp_path):
    from anomalib_study.detect import detect_abnormal
    from anomalib_study.evaluate import evaluate

    test_every_method_declares_each_parameter_once("mean_distance")
    root = make_synthetic_dagm(tmp_path / "synthetic", seed=0)

    metrics = evaluate(
        "mean_distance",
        "dagm",
        root,
        backbone="efficientnet_lite0",
        image_size=64,
        thres_ratio=0.8,
        out=tmp_path / "run",
        progress=False,
    )
    assert metrics["method"] == "mean_distance" and 0.5 < metrics["image_auroc"] <= 1.0
    assert metrics["params"]["thres_ratio"] == 0.8 and metrics["threshold_rule"] == "a quantile"
    assert metrics["environment"]["run_options"]["batch_size"] == registered.batch_size == 32

    normal = sorted(p for p in (root / "Class1" / "Train").iterdir() if p.suffix == ".PNG")[:12]
    images, test = tmp_path / "normal", tmp_path / "test"
    images.mkdir(), test.mkdir()
    for path in normal[:10]:
        shutil.copy(path, images / path.name)
    for path in normal[10:]:
        shutil.copy(path, test / path.name)
    run = detect_abnormal(
        test,
        db_dir=tmp_path / "db",
        image_dir=images,
        result_dir=tmp_path / "result",
        method="mean_distance",
        image_size=64,
        num_workers=0,
        progress=False,
    )
    assert (run / "scores.csv").is_file()
    assert (tmp_path / "db" / SPEC.model_file).is_file()

    code = main(
        [
            "evaluate",
            "--method",
            "mean_distance",
            "--dataset",
            "dagm",
            "--root",
            str(root),
            "--image-size",
            "64",
            "--thres-ratio",
            "0.7",
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    assert code == 0
    written = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert written["method"] == "mean_distance"

    reports = tmp_path / "reports" / "06_mean_distance"
    reports.mkdir(parents=True)
    (reports / "synthetic-b.metrics.json").write_text(json.dumps(written))
    table = comparison.detection_table(comparison.collect_reports(tmp_path / "reports"))
    assert list(table["method"]) == ["mean distance (test)"]
    assert table["image_auroc"].iloc[0] == written["image_auroc"]
    assert os.environ.get("ANOMALIB_STUDY_PLUGIN") is None  # nothing outside this file was changed or set


def test_a_method_is_read_only_and_replace_gives_a_copy():
    spec = methods.get_method("knn")
    with pytest.raises(AttributeError, match="read-only"):
        spec.label = "other"
    other = spec.replace(label="other")
    assert other.label == "other" and spec.label == "kNN" and type(other) is type(spec)
    assert other.fit_paths.__func__ is spec.fit_paths.__func__
    with pytest.raises(TypeError, match="no attribute"):
        Method(name="x", colour="red")
    with pytest.raises(ValueError, match="must declare fit_paths"):
        Method(name="x", estimator=MeanDistance)
