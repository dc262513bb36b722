"""Checks shared by every layer: the not-fitted check and parameter checks.

The lowest layer of the package beside :mod:`anomalib_study.errors`: the search layer,
the methods and the commands use them, and it imports none of them.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from anomalib_study.errors import NotFittedError, ParameterError

__all__ = [
    "NotFittedError",
    "check_is_fitted",
    "check_int",
    "check_fraction",
    "check_bool",
    "int_at_least",
    "check_text",
]


def check_is_fitted(estimator: Any, attributes: str | Iterable[str], fit_call: str = "fit(normal_embeddings)") -> None:
    """Raise :class:`NotFittedError` unless ``estimator`` has every one of ``attributes``.

    The message names the class and says what to call, e.g. "KNNDetector is not fitted
    yet: call fit(normal_embeddings) first".
    """
    names = [attributes] if isinstance(attributes, str) else list(attributes)
    if not all(hasattr(estimator, name) for name in names):
        raise NotFittedError(f"{type(estimator).__name__} is not fitted yet: call {fit_call} first")


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


def int_at_least(minimum: int | None = None, optional: bool = False):
    """A declaration's ``check(name, value)``: an int >= ``minimum`` (None allowed if ``optional``)."""

    def check(name: str, value: Any) -> None:
        if not (optional and value is None):
            check_int(name, value, minimum=minimum)

    return check


def check_text(name: str, value: Any) -> None:
    """A non-empty string; else ParameterError naming ``name``."""
    if not isinstance(value, str) or not value.strip():
        raise ParameterError(f"{name} must be a non-empty string, got {value!r}")


# ---------------------------------------------------------------------- readers of typed text
# How a parameter given as text (the command line) becomes a value; each raises
# ParameterError saying what is allowed. Methods name them in their parameter declarations.
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ParameterError(f"must be a positive integer, got {text}")
    return value


def odd_positive_int(text: str) -> int:
    value = int(text)
    if value < 1 or value % 2 == 0:
        raise ParameterError(f"must be an odd positive integer (1, 3, 5...), got {text}")
    return value


def open_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise ParameterError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def fraction_up_to_one(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ParameterError(f"must be in (0, 1] (e.g. 0.01, 0.1, 1.0), got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ParameterError(f"must be >= 0, got {text}")
    return value
