"""Anomaly detection methods: estimators on features (fit / score / predict / save / load).

Every method follows the same contract (see :mod:`anomalib_study.methods.base`):
``score`` returns higher = more anomalous, ``predict`` returns 1 = anomalous against the
calibrated ``threshold_``.
"""

from anomalib_study.methods.base import BaseDetector, NotFittedError, check_is_fitted
from anomalib_study.methods.knn import KNNDetector
from anomalib_study.methods.patchcore import PatchCore

#: method name -> estimator class
METHODS = {"knn": KNNDetector, "patchcore": PatchCore}

__all__ = ["BaseDetector", "KNNDetector", "METHODS", "PatchCore", "NotFittedError", "check_is_fitted"]
