"""The exceptions the package raises on bad input.

Every one of them carries a message meant for a person: it names the file, folder or
parameter that is wrong and says how to fix it. The command line prints that message on
one line (no traceback) and exits with status 2.
"""


class StudyError(Exception):
    """Base class of every error caused by the user's input, not by a bug."""


class DataError(StudyError):
    """An image, mask, label file or folder layout cannot be read as expected."""


class WeightsError(StudyError):
    """Backbone weights are missing, of the wrong shapes, or not what was recorded."""


class ModelFileError(StudyError):
    """A saved model or database is stale, foreign, corrupt or of another version."""


class ParameterError(StudyError, ValueError):
    """A parameter has an impossible value (e.g. k larger than the memory bank allows)."""


class NotFittedError(StudyError, AttributeError):
    """A method (or a search index) was used before ``fit``."""


class DiskFullError(StudyError, OSError):
    """A result could not be written: the file system is full (or over its quota). The
    message names the file, its folder and the space left there; nothing half-written is
    left behind (the earlier file, if any, is kept)."""
