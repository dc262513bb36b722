"""Anomaly detection methods: estimators on features (fit / score / predict / save / load).

Every method follows the same contract (see :mod:`anomalib_study.methods.base`):
``score`` returns higher = more anomalous, ``predict`` returns 1 = anomalous against the
calibrated ``threshold_``. Each method module also declares a
:class:`~anomalib_study.methods.base.MethodSpec` (``SPEC``): how it is fitted on and
scores image files, its parameters and defaults, its threshold rule, whether it gives
anomaly maps. ``evaluate``, ``detect`` and the command line read those declarations
(:data:`SPECS`, :func:`get_method`), so a new method plugs in here and nowhere else.
"""

from anomalib_study.checks import check_is_fitted
from anomalib_study.errors import NotFittedError, ParameterError
from anomalib_study.methods import autoencoder, clustering, knn, patchcore
from anomalib_study.methods.autoencoder import AutoEncoder
from anomalib_study.methods.clustering import AnomalyClustering
from anomalib_study.methods.base import BaseDetector, MethodParam, MethodSpec, RunOptions
from anomalib_study.methods.knn import KNNDetector
from anomalib_study.methods.patchcore import PatchCore

#: method name -> its declaration, in the order the command line lists them
SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in (knn.SPEC, patchcore.SPEC, autoencoder.SPEC,
                                                                  clustering.SPEC)}

#: method name -> estimator class
METHODS = {name: spec.estimator for name, spec in SPECS.items()}

#: the methods ``detect`` takes (task "detection"); the others group images (``anomalib-study cluster``)
DETECTORS: dict[str, MethodSpec] = {name: spec for name, spec in SPECS.items() if spec.task == "detection"}


def get_method(name: str) -> MethodSpec:
    """The declaration of method ``name``; ParameterError listing the methods otherwise."""
    if name not in SPECS:
        raise ParameterError(f"unknown method {name!r}: method must be one of {', '.join(map(repr, SPECS))}")
    return SPECS[name]


def get_detector(name: str) -> MethodSpec:
    """The declaration of detection method ``name``; ParameterError naming the detectors
    otherwise (and saying where a clustering method goes instead)."""
    spec = get_method(name)
    if spec.task != "detection":
        raise ParameterError(f"method {name!r} groups images into anomaly types, it does not flag anomalous "
                             f"images: use `anomalib-study cluster` (detect methods: {', '.join(map(repr, DETECTORS))})")
    return spec


__all__ = ["AnomalyClustering", "AutoEncoder", "DETECTORS", "BaseDetector", "KNNDetector", "METHODS", "MethodParam", "MethodSpec", "NotFittedError", "PatchCore",
           "RunOptions", "SPECS", "check_is_fitted", "get_detector", "get_method"]
