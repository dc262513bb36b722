"""anomalib_study: a reproducible study of image anomaly detection methods.

Data flows one way: files -> records (:mod:`anomalib_study.data`) -> images -> features
(:mod:`anomalib_study.backbones`, :mod:`anomalib_study.features`) -> method
(:mod:`anomalib_study.methods`) -> scores / maps -> metrics (:mod:`anomalib_study.metrics`)
-> report (:mod:`anomalib_study.runner`).

The public API is importable from the top level::

    from anomalib_study import detect_abnormal, evaluate, load_backbone, KNNDetector, PatchCore, AutoEncoder

Each name is imported on first use (PEP 562), so ``import anomalib_study`` stays fast and
loads neither torch nor faiss.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "detect_abnormal": "anomalib_study.detect",
    "evaluate": "anomalib_study.evaluate",
    "load_backbone": "anomalib_study.backbones",
    "load_dataset": "anomalib_study.data",
    "make_synthetic_dagm": "anomalib_study.data.synthetic",
    "AutoEncoder": "anomalib_study.methods.autoencoder",
    "KNNDetector": "anomalib_study.methods.knn",
    "PatchCore": "anomalib_study.methods.patchcore",
    "StudyError": "anomalib_study.errors",
}

__all__ = sorted(_PUBLIC) + ["__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from anomalib_study.backbones import load_backbone
    from anomalib_study.data import load_dataset
    from anomalib_study.data.synthetic import make_synthetic_dagm
    from anomalib_study.detect import detect_abnormal
    from anomalib_study.errors import StudyError
    from anomalib_study.evaluate import evaluate
    from anomalib_study.methods.autoencoder import AutoEncoder
    from anomalib_study.methods.knn import KNNDetector
    from anomalib_study.methods.patchcore import PatchCore


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'anomalib_study' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
