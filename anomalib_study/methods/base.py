"""What every method shares: the not-fitted check, parameter checks, ``get_params`` and
versioned single-file save/load (an ``.npz`` with a JSON metadata entry).

A method is an estimator on features (scikit-learn style): ``__init__`` only stores its
keyword arguments under the same names; ``fit`` validates, sets learned state with a
trailing underscore and returns ``self``; every other public method first checks that
the model is fitted.
"""

from __future__ import annotations

import inspect
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from anomalib_study.errors import ModelFileError, ParameterError, StudyError
from anomalib_study.io import atomic_write

__all__ = [
    "NotFittedError",
    "BaseDetector",
    "check_is_fitted",
    "check_int",
    "check_fraction",
    "check_bool",
    "check_embeddings",
    "save_model_file",
    "load_model_file",
]

_METADATA_KEY = "__metadata__"


class NotFittedError(StudyError, AttributeError):
    """A method was used before ``fit``."""


def check_is_fitted(estimator: Any, attributes: str | Iterable[str], fit_call: str = "fit(normal_embeddings)") -> None:
    """Raise :class:`NotFittedError` unless ``estimator`` has every one of ``attributes``.

    The message names the class and says what to call, e.g. "KNNDetector is not fitted
    yet: call fit(normal_embeddings) first".
    """
    names = [attributes] if isinstance(attributes, str) else list(attributes)
    if not all(hasattr(estimator, name) for name in names):
        raise NotFittedError(
            f"{type(estimator).__name__} is not fitted yet: call {fit_call} first"
        )


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (bools refused), at least ``minimum``; else ParameterError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ParameterError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float strictly between 0 and 1; else ParameterError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ParameterError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise ParameterError(f"{name} must be strictly between 0 and 1, got {value}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterError(f"{name} must be True or False, got {value!r}")
    return bool(value)


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


class BaseDetector:
    """Shared plumbing: ``get_params``/``set_params`` from the ``__init__`` signature, and ``repr``."""

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [p.name for p in signature.parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD]

    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` arguments, by name (scikit-learn style)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> "BaseDetector":
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ParameterError(f"{type(self).__name__} has no parameter {name!r}; valid: {valid}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def save_model_file(path: str | os.PathLike, format_name: str, version: int, metadata: dict, arrays: dict[str, np.ndarray]) -> Path:
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


def load_model_file(path: str | os.PathLike, format_name: str, version: int, required: Iterable[str] = ()) -> tuple[dict, dict[str, np.ndarray]]:
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
        raise ModelFileError(f"{path} holds format {found!r}, not {format_name!r}: it was written by another program or method")
    if header.get("version") != version:
        raise ModelFileError(
            f"{path} is version {header.get('version')!r} of {format_name!r}; this code reads version {version}: "
            "fit and save the model again"
        )
    missing = [name for name in required if name not in arrays]
    if missing:
        raise ModelFileError(f"{path} is incomplete: arrays {missing} are missing")
    return header, arrays
