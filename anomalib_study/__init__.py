"""anomalib_study: a reproducible study of image anomaly detection methods.

Data flows one way: files -> records (:mod:`anomalib_study.data`) -> images -> features
(:mod:`anomalib_study.backbones`, :mod:`anomalib_study.features`) -> method
(:mod:`anomalib_study.methods`) -> scores / maps -> metrics (:mod:`anomalib_study.metrics`)
-> report (:mod:`anomalib_study.runner`).
"""

__version__ = "0.1.0"
