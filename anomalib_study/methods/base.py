"""What every method shares: the checks of features (``check_embeddings``,
``check_patches``), versioned single-file save / load (an ``.npz`` with a JSON metadata
entry), :class:`RunOptions` and :class:`Method`, the declaration of a method as the study
runs it. The estimators' parameter declarations (:class:`Param`, :class:`BaseDetector`)
live in :mod:`anomalib_study.methods.params` and are importable from here too.

A method's estimator works on features (scikit-learn style): ``__init__`` only stores its
keyword arguments under the same names; ``fit`` validates, sets learned state with a
trailing underscore and returns ``self``; every other public method first checks that the
model is fitted.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from anomalib_study.checks import check_bool, check_fraction, check_int, check_is_fitted
from anomalib_study.errors import ModelFileError, NotFittedError, ParameterError
from anomalib_study.io import atomic_write
from anomalib_study.methods.params import PARAM_KINDS, BaseDetector, MethodParam, Param  # noqa: F401 (re-exported)

__all__ = [
    "NotFittedError",
    "BaseDetector",
    "check_is_fitted",
    "check_int",
    "check_fraction",
    "check_bool",
    "check_embeddings",
    "check_patches",
    "gaussian_kernel_size",
    "save_model_file",
    "load_model_file",
    "Method",
    "MethodParam",
    "Param",
    "MethodSpec",
    "RunOptions",
]

_METADATA_KEY = "__metadata__"


def check_embeddings(X: Any, name: str = "X", n_features: int | None = None, min_samples: int = 1) -> np.ndarray:
    """A float32 C-contiguous copy of ``X`` (n_samples, n_features), checked.

    Raises ParameterError (naming ``name``) if ``X`` is not 2-D, has fewer than
    ``min_samples`` rows, holds NaN/inf, or has a number of features other than
    ``n_features``.
    """
    try:
        array = np.array(X, dtype=np.float32, order="C", copy=True)
    except (TypeError, ValueError) as error:
        raise ParameterError(f"{name} must be a 2-D array of numbers: {error}") from None
    if array.ndim != 2:
        raise ParameterError(f"{name} must be 2-D (n_samples, n_features), got shape {array.shape}")
    if array.shape[0] < min_samples:
        raise ParameterError(f"{name} needs at least {min_samples} row(s), got {array.shape[0]}")
    if array.shape[1] == 0:
        raise ParameterError(f"{name} has no features (shape {array.shape})")
    if not np.isfinite(array).all():
        rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise ParameterError(
            f"{name} contains NaN or infinite values in {rows.size} row(s) (first: row {int(rows[0])}); "
            "fix or drop those rows"
        )
    if n_features is not None and array.shape[1] != n_features:
        raise ParameterError(
            f"{name} has {array.shape[1]} features but the model was fitted on {n_features}: "
            "use embeddings from the same backbone"
        )
    return array


def check_patches(X: Any, name: str, n_features: int | None = None, n_patches: int | None = None) -> np.ndarray:
    """``X`` as a float32 (n_images, h*w, D) array of patch features, checked: ParameterError
    (naming ``name``) if it is not a non-empty 3-D array of numbers, or its D or patch count
    differs from ``n_features`` / ``n_patches`` (the fitted model's)."""
    if hasattr(X, "detach"):  # a torch tensor (torch is not imported here)
        X = X.detach().cpu().numpy()
    try:
        array = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ParameterError(f"{name} must be an array (n_images, h*w, D) of numbers: {error}") from None
    if array.ndim != 3 or 0 in array.shape:
        raise ParameterError(f"{name} must be a non-empty (n_images, h*w, D) array, got shape {array.shape}")
    if n_features is not None and array.shape[2] != n_features:
        raise ParameterError(
            f"{name} has D={array.shape[2]} but the model was fitted on D={n_features}: "
            "use the same backbone, layers and dimensions"
        )
    if n_patches is not None and array.shape[1] != n_patches:
        raise ParameterError(
            f"{name} has {array.shape[1]} patches per image but the model was fitted on "
            f"{n_patches}: use the same image size"
        )
    return array


def gaussian_kernel_size(sigma: float) -> int:
    """Side of the Gaussian kernel used for ``sigma``: 2 * int(4 * sigma + 0.5) + 1 (scipy's truncate=4)."""
    return 2 * int(4.0 * float(sigma) + 0.5) + 1


def save_model_file(
    path: str | os.PathLike, format_name: str, version: int, metadata: dict, arrays: dict[str, np.ndarray]
) -> Path:
    """Write one ``.npz`` holding ``arrays`` and a JSON metadata entry, atomically.

    The metadata entry records ``format`` and ``version`` so that :func:`load_model_file`
    can refuse a foreign or old file with a clear message.
    """
    path = Path(path)
    if _METADATA_KEY in arrays:
        raise ValueError(f"array name {_METADATA_KEY!r} is reserved")
    header = {"format": format_name, "version": int(version), **metadata}
    payload = {_METADATA_KEY: np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)}
    payload.update({name: np.asarray(value) for name, value in arrays.items()})
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **payload)
    return path


def load_model_file(
    path: str | os.PathLike, format_name: str, version: int, required: Iterable[str] = ()
) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a file written by :func:`save_model_file`: (metadata dict, arrays dict).

    Raises ModelFileError naming ``path`` when it is missing, not an npz, has no
    metadata, is of another format or version, or lacks one of ``required`` arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if _METADATA_KEY not in names:
                raise ModelFileError(
                    f"{path} is not an anomalib_study model file (no metadata entry); expected format {format_name!r}"
                )
            header = json.loads(npz[_METADATA_KEY].tobytes().decode("utf-8"))
            arrays = {name: npz[name] for name in names if name != _METADATA_KEY}
    except ModelFileError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, UnicodeDecodeError, KeyError) as error:
        raise ModelFileError(f"{path} cannot be read as a model file (corrupt or not an .npz): {error}") from None
    if not isinstance(header, dict) or header.get("format") != format_name:
        found = header.get("format") if isinstance(header, dict) else None
        raise ModelFileError(
            f"{path} holds format {found!r}, not {format_name!r}: it was written by another program or method"
        )
    if header.get("version") != version:
        raise ModelFileError(
            f"{path} is version {header.get('version')!r} of {format_name!r}; this code reads version {version}: "
            "fit and save the model again"
        )
    missing = [name for name in required if name not in arrays]
    if missing:
        raise ModelFileError(f"{path} is incomplete: arrays {missing} are missing")
    return header, arrays


# ---------------------------------------------------------------------- method declarations
@dataclass(frozen=True)
class RunOptions:
    """How images go through the backbone: not part of a fitted model, never stored with it.

    ``cache``: the feature cache for methods that cache embeddings (``None``, ``"default"``
    or a :class:`~anomalib_study.features.FeatureCache`).
    """

    device: str = "cpu"
    batch_size: int = 32
    num_workers: int = 0
    progress: bool = True
    cache: Any = None


#: task -> the hooks a method of that task must declare
TASKS = {
    "detection": ("fit_paths", "score_paths", "describe", "check_loaded", "n_images"),
    "clustering": ("cluster_images",),
}


class Method:
    """A method of the study: what ``evaluate``, ``detect``, the command line and the reports
    need of it, declared once. A method module subclasses it, setting the attributes below
    as class attributes and writing the hooks as methods, and declares one instance as
    ``SPEC``::

        class KNN(Method):
            name, label, estimator, description = "knn", "kNN", KNNDetector, "deep nearest neighbours"

            def fit_paths(self, backbone, paths, params, run): ...

    (``Method(name=..., fit_paths=function, ...)`` builds one from keyword arguments too:
    a method written in a notebook or a test.) An instance is read-only; :meth:`replace`
    gives a copy with other values.


    ``name`` is the method's key (``"knn"``), ``label`` how reports name it (``"kNN"``),
    ``batch_size`` the images per forward pass ``evaluate``, ``detect`` and ``cluster`` use
    unless told otherwise (default: the estimator's declared ``batch_size``, else 32),
    ``resize_mode`` the only input geometry the method works with (None: any; the
    autoencoder squashes the whole image, so its maps line up only with ``"squash"``),
    ``image_size`` the input side used when none is given (None: the backbone's default).
    ``params`` (the command line's and ``evaluate``'s method parameters) default to the
    estimator's declared model parameters (:class:`Param`, ``kind="model"``) followed by
    ``extra_params``, options of the method's evaluation that are not the estimator's.
    ``quick_params``: settings under which a fit on a dozen small images takes seconds
    (tests and smoke runs of every registered method read them; never a study's result).
    Each method module declares one as ``SPEC``; the registry
    (:func:`anomalib_study.methods.register`) names it. A new method plugs in by declaring
    its own and registering it, with no change to the shared modules. The hooks (methods
    that depend on their arguments only; a hook left None is one the method does not have):

    ``fit_paths(backbone, paths, params, run) -> model``
        fit on normal image files; ``params`` holds every declared parameter (defaults
        filled in), ``run`` the :class:`RunOptions`.
    ``score_paths(model, backbone, paths, run, errors) -> dict``
        ``image_scores`` (n,) float (higher = more anomalous), one ``image_scores_<kind>``
        per name of ``score_kinds``, and ``anomaly_maps`` (n, S, S) float32 when
        ``produces_maps``. With ``errors`` (an empty dict) an unreadable image is skipped:
        position -> reason is recorded there and its scores are NaN; without, it raises
        DataError.
    ``describe(model) -> dict``
        JSON-able: the value of every declared parameter the model was fitted with,
        ``threshold`` (None if the model has none), ``threshold_rule`` (one sentence), and
        the method's own figures (bank size, k used, ...).
    ``check_loaded(model, section, n_images) -> str | None``
        what is inconsistent between a loaded model and the ``describe`` section and
        image count stored beside it, or None.
    ``n_images(model) -> int``
        how many normal images the model was fitted on (held-out calibration included).
    ``sweep(model, scored, params, values) -> list``
        optional, for ``evaluate``: the test images (``scored``: what ``score_paths``
        returned) scored with other values of one parameter (``sweep_param``), as
        ``(value, test_scores, threshold)`` triples.
    ``threshold_problem(params) -> str | None``
        optional: why a model fitted with ``params`` would have no threshold (``detect``
        needs one and refuses such parameters before any work), or None.
    ``calibration_scores(model) -> array``
        optional: the scores of the normal images the threshold was taken from.
    ``uses_backbone_weights(params) -> bool``
        optional, for every task: whether a model fitted with ``params`` computes with the backbone's
        weights (default: always; the autoencoder's ``model="conv"`` does not). ``evaluate``
        records their sha256 in a report's ``environment``, or ``"none"``.

    ``task`` says which evaluation path a method takes: ``"detection"`` (the hooks above:
    ``evaluate`` reports AUROC, ``detect`` builds databases) or ``"clustering"`` (grouping
    images into anomaly types: ``evaluate`` reports NMI / ARI / F1, ``detect`` refuses it).
    A clustering method declares instead:

    ``cluster_images(backbone, paths, normal_paths, params, run, n_clusters) -> dict``
        group the images at ``paths`` without labels (``normal_paths``: normal images, for
        variants that use them, or empty; ``n_clusters``: None = the method chooses).
        Returns ``runs``: one dict per variant compared (``name``, ``labels`` (n,),
        ``description`` (JSON-able: settings and what was chosen, e.g. tau and how),
        ``curve``: the labels at other values of the method's free parameter, as a list of
        ``{"value", "relative", "labels"}`` (``relative``: the value over the one chosen, or
        the string ``"inf"``; ``value`` None for an infinite one), and optionally ``weights`` / ``embeddings``
        arrays kept in memory only), ``timings`` and ``grid`` (patch grid or None).
    ``needs_normal_images(params) -> bool``
        whether ``params`` need normal (training) images.
    ``validate(params)``
        ParameterError if a value is impossible (default: the estimator built with
        ``params`` validates them).
    """

    # what the method is
    name: str = ""
    label: str = ""
    estimator: type | None = None
    description: str = ""
    task: str = "detection"
    params: tuple[MethodParam, ...] | None = None
    extra_params: tuple[MethodParam, ...] = ()
    score_kinds: tuple[str, ...] = ()
    produces_maps: bool = False
    batch_size: int | None = None
    resize_mode: str | None = None
    image_size: int | None = None
    uses_embedding: bool = False
    min_images: int = 2
    sweep_param: str | None = None
    quick_params: Mapping[str, Any] = MappingProxyType({})
    # the hooks: a subclass writes them as methods (None: the method has none)
    fit_paths: Callable[..., Any] | None = None
    score_paths: Callable[..., dict] | None = None
    describe: Callable[[Any], dict] | None = None
    check_loaded: Callable[[Any, dict, int], str | None] | None = None
    n_images: Callable[[Any], int] | None = None
    cluster_images: Callable[..., dict] | None = None
    needs_normal_images: Callable[[dict], bool] | None = None
    uses_backbone_weights: Callable[[dict], bool] | None = None
    validate: Callable[[dict], None] | None = None
    sweep: Callable[..., list] | None = None
    threshold_problem: Callable[[dict], str | None] | None = None
    calibration_scores: Callable[[Any], Any] | None = None

    _FIELDS = (
        "name", "label", "estimator", "description", "task", "params", "extra_params", "score_kinds",
        "produces_maps", "batch_size", "resize_mode", "image_size", "uses_embedding", "min_images", "sweep_param",
        "quick_params", "fit_paths", "score_paths", "describe", "check_loaded", "n_images", "cluster_images",
        "needs_normal_images", "uses_backbone_weights", "validate", "sweep", "threshold_problem", "calibration_scores",
    )  # fmt: skip

    def __init__(self, *args: Any, **given: Any) -> None:
        if len(args) > 5:
            raise TypeError("Method takes at most 5 positional arguments (name, label, estimator, description, params)")
        for key, value in zip(("name", "label", "estimator", "description", "params"), args):
            if key in given:
                raise TypeError(f"Method got multiple values for {key!r}")
            given[key] = value
        unknown = sorted(set(given) - set(self._FIELDS))
        if unknown:
            raise TypeError(
                f"Method has no attribute(s) {', '.join(unknown)}; its attributes: {', '.join(self._FIELDS)}"
            )
        values = dict(given)
        declared = getattr(self.estimator if "estimator" not in given else given["estimator"], "declared_params", None)
        if values.get("params", self.params) is None:  # the estimator's declared model parameters, then its own
            model = declared("model") if declared else {}
            offered = tuple(p.method_param() for p in model.values() if p.offered)
            values["params"] = tuple(values.get("extra_params", self.extra_params)) + offered
        if values.get("batch_size", self.batch_size) is None:  # the estimator's declared run option, else 32
            run = declared("run") if declared else {}
            values["batch_size"] = run["batch_size"].default if "batch_size" in run else 32
        values["quick_params"] = MappingProxyType(dict(values.get("quick_params", self.quick_params)))
        for key, value in values.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_given", dict(given))
        if not self.name:
            raise ValueError(f"{type(self).__name__} has no name")
        if self.task not in TASKS:
            raise ValueError(f"method {self.name!r}: task must be one of {', '.join(TASKS)}, got {self.task!r}")
        missing = [hook for hook in TASKS[self.task] if getattr(self, hook) is None]
        if missing:
            raise ValueError(f"method {self.name!r} of task {self.task!r} must declare {', '.join(missing)}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"method {self.name!r} is read-only: use replace({name}=...) for a copy with another value"
        )

    def replace(self, **changes: Any) -> "Method":
        """A copy with ``changes`` (e.g. a hook wrapped by a test)."""
        return type(self)(**{**self._given, **changes})

    def __repr__(self) -> str:
        return f"<method {self.name!r} ({self.task}): {type(self).__name__}>"

    @property
    def model_file(self) -> str:
        """The model's file name inside a detect database folder."""
        return f"{self.name}_model.npz"

    @property
    def default_db_dir(self) -> str:
        return f"{self.name}_db"

    def defaults(self) -> dict[str, Any]:
        return {param.name: param.default for param in self.params}

    def resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """Every declared parameter: ``given`` values over the defaults. An undeclared name
        -> ParameterError listing the valid ones."""
        unknown = sorted(set(given) - {param.name for param in self.params})
        if unknown:
            valid = ", ".join(param.name for param in self.params)
            raise ParameterError(
                f"method {self.name!r} has no parameter(s) {', '.join(unknown)}; its parameters: {valid}"
            )
        return {**self.defaults(), **given}

    def resolve_resize_mode(self, resize_mode: str | None) -> str:
        """The input geometry to use: ``resize_mode``, or when None the method's own (or
        ``"crop"``); ParameterError if the method works with another one only."""
        if resize_mode is None:
            return self.resize_mode or "crop"
        if self.resize_mode is not None and resize_mode != self.resize_mode:
            raise ParameterError(
                f"method {self.name!r} works on resize_mode={self.resize_mode!r} only "
                f"(got {resize_mode!r}): leave resize_mode unset or pass {self.resize_mode!r}"
            )
        return resize_mode

    def check_params(self, params: dict[str, Any]) -> None:
        """ParameterError (the estimator's own message) if a value is impossible: checked
        before any image is read."""
        if self.validate is not None:
            self.validate(params)
            return
        model = self.estimator(**params)
        validate = getattr(model, "_validate_params", None)
        if validate is not None:
            validate()

    def load(self, path: str | os.PathLike, device: str = "cpu"):
        """The fitted model saved at ``path`` (the estimator's own ``load``)."""
        return self.estimator.load(path, device=device)


#: the name the declarations had before they were a class (``MethodSpec(name=..., fit_paths=...)`` still builds one)
MethodSpec = Method
