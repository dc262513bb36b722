"""Anomaly detection methods: estimators on features (fit / score / predict / save / load).

Every method follows the same contract (see :mod:`anomalib_study.methods.base`):
``score`` returns higher = more anomalous, ``predict`` returns 1 = anomalous against the
calibrated ``threshold_``. Each method module also declares a
:class:`~anomalib_study.methods.base.MethodSpec` (``SPEC``): how it is fitted on and
scores image files, its parameters and defaults, its threshold rule, whether it gives
anomaly maps. ``evaluate``, ``detect``, the command line and the comparison read those
declarations through this registry (:data:`REGISTRY`, :func:`get_method`), so a new
method plugs in with one :func:`register` call and nowhere else.

The registry names each method's declaration as ``"module:attribute"`` with its label and
task (and, for ``anomalib-study verify``, the :class:`Tolerance` of each of its figures that
cannot be bit-exact on another CPU), and imports a method's module only when that method is used: reading the registry
(the comparison, the front page) loads neither torch nor the other methods, and a
notebook's kernel loads only the method it runs (what its report's freshness follows).
"""

from __future__ import annotations

import fnmatch
import importlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

from anomalib_study.checks import check_is_fitted
from anomalib_study.errors import NotFittedError, ParameterError
from anomalib_study.methods.base import BaseDetector, MethodParam, MethodSpec, RunOptions

TASKS = ("detection", "clustering")


@dataclass(frozen=True)
class Tolerance:
    """How far a re-run's number may lie from the committed one and still match
    (``anomalib-study verify``), for the metrics keys of one family.

    ``keys``: ``fnmatch`` patterns on a metrics key with its list indices dropped
    (``history[3].train_loss`` is ``history.train_loss``, ``train_scores[7]`` is
    ``train_scores``); two numbers a, b match when
    ``|a - b| <= max(absolute, relative * max(|a|, |b|))``; ``reason``: why these figures
    cannot be exact, one sentence (``verify`` and the docs say it).
    """

    keys: tuple[str, ...]
    absolute: float = 0.0
    relative: float = 0.0
    reason: str = ""

    def __post_init__(self) -> None:
        keys = (self.keys,) if isinstance(self.keys, str) else tuple(self.keys)
        if not keys or not all(isinstance(key, str) and key for key in keys):
            raise ParameterError(f"Tolerance keys must be non-empty key patterns, got {self.keys!r}")
        object.__setattr__(self, "keys", keys)
        for name in ("absolute", "relative"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ParameterError(f"Tolerance {name} must be a finite number >= 0, got {value!r}")
        if not self.reason:
            raise ParameterError(f"Tolerance for {', '.join(keys)}: say why in reason")

    def matches(self, key: str) -> bool:
        """Whether metrics key ``key`` (``history[3].train_loss``) is of this family."""
        family = family_key(key)
        return any(fnmatch.fnmatchcase(family, pattern) for pattern in self.keys)

    def allows(self, committed: float, new: float) -> bool:
        """Whether ``new`` lies within this tolerance of ``committed``."""
        if committed == new:
            return True
        difference = abs(float(new) - float(committed))
        return difference <= max(self.absolute, self.relative * max(abs(committed), abs(new)))

    def describe(self) -> str:
        """``"absolute 0.001"``, ``"relative 1e-09"`` or ``"absolute 0.001 or relative 0.01"``."""
        parts = [f"{name} {value:g}" for name, value in (("absolute", self.absolute), ("relative", self.relative))]
        shown = [part for part, value in zip(parts, (self.absolute, self.relative)) if value]
        return " or ".join(shown) or "exact"


def family_key(key: str) -> str:
    """A metrics key with its list indices dropped: ``per_image[3].score`` -> ``per_image.score``."""
    return re.sub(r"\[\d+\]", "", key)


#: the autoencoder's figures that cannot be bit-exact on another CPU. It trains its network by
#: gradient descent from a seed; a float sum's order (BLAS kernels, SIMD width, thread count)
#: differs between CPUs, so the rounding of each step differs and the trajectory drifts slightly
#: (seen: training losses 1e-4 to 7e-4 apart with the image AUROC equal). Every figure computed
#: from the scores (AUROC, F1, PRO, accuracy, predicted labels) and the epoch counts, the best
#: epoch and the learning rates stay exact: a change there changes the result.
AUTOENCODER_TOLERANCES = (
    Tolerance(
        ("history.train_loss", "history.val_loss"),
        absolute=1e-3,
        reason="per-epoch training and validation losses of the autoencoder: SGD summed in another order on "
        "another CPU drifts slightly",
    ),
    Tolerance(
        (
            "per_image.score",
            "per_image.score_*",
            "per_image.map_max",
            "train_scores",
            "threshold",
            "image_f1_threshold",
            "pixel_f1_threshold",
        ),
        relative=5e-2,
        reason="reconstruction-based scores (per-image scores, map maxima, calibration scores and thresholds "
        "taken from them) of a network whose weights drift slightly on another CPU",
    ),
)


@dataclass(frozen=True)
class MethodEntry:
    """One registered method, read without importing it.

    ``target``: ``"module:attribute"`` of its :class:`MethodSpec`; ``label``: how reports
    and tables name it; ``task``: ``"detection"`` or ``"clustering"``; ``published``:
    optionally ``"module:function"`` of its published comparison (a report's metrics in,
    rows out: this run's row, then the published figures; see :mod:`anomalib_study.published`);
    ``notebook``: the stem of the study notebook that reports it (its parameters cell
    agrees with the declaration: names and defaults, checked by the tests);
    ``seed_table``: optionally ``"module:function"`` that reproduces the seed work's own
    table from this method's reports (a reports table in, a
    :class:`~anomalib_study.seed_tables.SeedTable` out: ours beside the published figures);
    ``family_param`` / ``families``: where the method's reports fall into families the study
    compares apart (the parameter read from each report's ``params`` and ``(value, label)``
    pairs in the order the tables list them, e.g. the autoencoder's ``model``: conv or
    pretrained); none: the method is one family, named by its label.
    ``tolerances``: the :class:`Tolerance` of each family of its figures that cannot be
    bit-exact on another CPU (first match wins; every other number is compared exactly,
    up to float rounding: :mod:`anomalib_study.verify_compare`).
    """

    name: str
    target: str
    label: str
    task: str = "detection"
    published: str | None = None
    notebook: str | None = None
    seed_table: str | None = None
    family_param: str | None = None
    families: tuple[tuple[str, str], ...] = ()
    tolerances: tuple[Tolerance, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tolerances", tuple(self.tolerances))
        if not all(isinstance(tolerance, Tolerance) for tolerance in self.tolerances):
            raise ParameterError(f"method {self.name!r}: tolerances must be Tolerance declarations")
        if self.task not in TASKS:
            raise ParameterError(f"method {self.name!r}: task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for what, value in (("target", self.target), ("published", self.published), ("seed_table", self.seed_table)):
            if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
                raise ParameterError(f"method {self.name!r}: {what} must read 'module:attribute', got {value!r}")


def _resolve(target: str) -> Any:
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


#: method name -> its entry, in the order the command line and the tables list them
REGISTRY: dict[str, MethodEntry] = {}
_LOADED: dict[str, MethodSpec] = {}


def register(entry: MethodEntry, spec: MethodSpec | None = None, *, replace: bool = False) -> MethodEntry:
    """Add a method to the registry. ``spec``: its declaration when it is already built (a
    method defined in a notebook or a test), else it is imported from ``entry.target`` on
    first use. A taken name -> ParameterError unless ``replace``."""
    if entry.name in REGISTRY and not replace:
        raise ParameterError(f"a method named {entry.name!r} is registered already; pass replace=True to replace it")
    if spec is not None:
        _check_entry(entry, spec)
        _LOADED[entry.name] = spec
    else:
        _LOADED.pop(entry.name, None)
    REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove method ``name`` from the registry (a method a test registered)."""
    REGISTRY.pop(name, None)
    _LOADED.pop(name, None)


def _check_entry(entry: MethodEntry, spec: MethodSpec) -> None:
    if not isinstance(spec, MethodSpec):
        raise ParameterError(f"{entry.target} is a {type(spec).__name__}, not a MethodSpec")
    if (spec.name, spec.task) != (entry.name, entry.task):
        raise ParameterError(
            f"method {entry.name!r} (task {entry.task!r}) is registered with the declaration of "
            f"{spec.name!r} (task {spec.task!r})"
        )


def get_method(name: str) -> MethodSpec:
    """The declaration of method ``name`` (its module imported on first use); ParameterError
    listing the methods otherwise."""
    if name not in REGISTRY:
        raise ParameterError(f"unknown method {name!r}: method must be one of {', '.join(map(repr, REGISTRY))}")
    if name not in _LOADED:
        spec = _resolve(REGISTRY[name].target)
        _check_entry(REGISTRY[name], spec)
        _LOADED[name] = spec
    return _LOADED[name]


def get_detector(name: str) -> MethodSpec:
    """The declaration of detection method ``name``; ParameterError naming the detectors
    otherwise (and saying where a clustering method goes instead)."""
    if name in REGISTRY and REGISTRY[name].task != "detection":
        raise ParameterError(
            f"method {name!r} groups images into anomaly types, it does not flag anomalous "
            f"images: use `anomalib-study cluster` (detect methods: {', '.join(map(repr, DETECTORS))})"
        )
    return get_method(name)


def method_label(name: str) -> str:
    """How reports name method ``name`` (its registered label; the name itself if unknown)."""
    entry = REGISTRY.get(name)
    return entry.label if entry is not None else name


def method_task(name: str) -> str:
    """The task of method ``name`` (``""`` if unknown)."""
    entry = REGISTRY.get(name)
    return entry.task if entry is not None else ""


def published_comparison(name: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]] | None:
    """Method ``name``'s published comparison function, or None when it declares none."""
    entry = REGISTRY.get(name)
    return _resolve(entry.published) if entry is not None and entry.published else None


def seed_table(name: str) -> Callable[[Any], Any] | None:
    """Method ``name``'s seed-table function (its reports in, the seed work's table out), or None."""
    entry = REGISTRY.get(name)
    return _resolve(entry.seed_table) if entry is not None and entry.seed_table else None


def method_families(name: str) -> list[str]:
    """The families method ``name``'s reports fall into, in table order (its label alone when it declares none)."""
    entry = REGISTRY.get(name)
    if entry is None:
        return [name]
    return [label for _, label in entry.families] or [entry.label]


def method_family(name: str, params: Mapping[str, Any] | None = None) -> str:
    """The family of a report of method ``name`` with ``params`` (its metrics' ``params``): the
    label its entry gives the value of ``family_param`` (the value itself when it has no label),
    else the method's label."""
    entry = REGISTRY.get(name)
    if entry is None or entry.family_param is None:
        return method_label(name)
    value = (params or {}).get(entry.family_param)
    return dict(entry.families).get(value, f"{entry.label} ({value})")


class RegistryView(Mapping):
    """method name -> ``value(name)`` over the registry as it is now (a method registered
    later is in it too); ``keep(entry)`` picks the methods listed. The views below import a
    method's declaration only when it is looked up."""

    def __init__(self, value: Callable[[str], Any], keep: Callable[[MethodEntry], bool] = lambda entry: True) -> None:
        self._value, self._keep = value, keep

    def _names(self) -> list[str]:
        return [name for name, entry in REGISTRY.items() if self._keep(entry)]

    def __getitem__(self, name: str) -> Any:
        if name not in self._names():
            raise KeyError(name)
        return self._value(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"<methods {', '.join(self._names())}>"


#: method name -> its declaration (imported on look-up)
SPECS: Mapping[str, MethodSpec] = RegistryView(get_method)
#: method name -> estimator class (imported on look-up)
METHODS: Mapping[str, type] = RegistryView(lambda name: get_method(name).estimator)
#: the methods ``detect`` takes (task "detection"); the others group images (``anomalib-study cluster``)
DETECTORS: Mapping[str, MethodSpec] = RegistryView(get_method, keep=lambda entry: entry.task == "detection")

for _entry in (
    MethodEntry(
        "knn",
        "anomalib_study.methods.knn:SPEC",
        "kNN (DN2)",
        "detection",
        "anomalib_study.published:dn2_comparison",
        "01_knn_detection",
        seed_table="anomalib_study.seed_tables:dn2_seed_table",
    ),
    MethodEntry(
        "patchcore",
        "anomalib_study.methods.patchcore:SPEC",
        "PatchCore",
        "detection",
        "anomalib_study.published:patchcore_comparison",
        "02_patchcore",
        seed_table="anomalib_study.seed_tables:patchcore_seed_table",
    ),
    MethodEntry(
        "autoencoder",
        "anomalib_study.methods.autoencoder:SPEC",
        "autoencoder",
        "detection",
        "anomalib_study.published:autoencoder_comparison",
        "03_autoencoder",
        seed_table="anomalib_study.seed_tables:autoencoder_seed_table",
        family_param="model",
        families=(("conv", "convolutional autoencoder"), ("pretrained", "pretrained-encoder autoencoder")),
        tolerances=AUTOENCODER_TOLERANCES,
    ),
    MethodEntry(
        "clustering",
        "anomalib_study.methods.clustering:SPEC",
        "anomaly clustering",
        "clustering",
        "anomalib_study.published:anomaly_clustering_nearest",
        "04_anomaly_clustering",
        seed_table="anomalib_study.seed_tables:anomaly_clustering_seed_table",
    ),
):
    register(_entry)

#: public name -> the module that defines it, imported on first use (PEP 562)
_LAZY = {
    "AnomalyClustering": "anomalib_study.methods.clustering",
    "AutoEncoder": "anomalib_study.methods.autoencoder",
    "KNNDetector": "anomalib_study.methods.knn",
    "PatchCore": "anomalib_study.methods.patchcore",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("knn", "patchcore", "autoencoder", "clustering", "coreset"):
        return importlib.import_module(f"anomalib_study.methods.{name}")
    raise AttributeError(f"module 'anomalib_study.methods' has no attribute {name!r}")


__all__ = [
    "AUTOENCODER_TOLERANCES",
    "AnomalyClustering",
    "AutoEncoder",
    "DETECTORS",
    "BaseDetector",
    "KNNDetector",
    "METHODS",
    "MethodEntry",
    "MethodParam",
    "MethodSpec",
    "NotFittedError",
    "PatchCore",
    "REGISTRY",
    "RegistryView",
    "RunOptions",
    "SPECS",
    "Tolerance",
    "check_is_fitted",
    "family_key",
    "get_detector",
    "get_method",
    "method_families",
    "method_family",
    "method_label",
    "method_task",
    "published_comparison",
    "register",
    "seed_table",
    "unregister",
]
