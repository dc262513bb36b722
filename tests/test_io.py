"""anomalib_study.io helpers that no other module's tests cover."""

from pathlib import Path

import numpy as np

from anomalib_study.io import as_json


def test_as_json_is_what_a_json_file_reads_back():
    value = {"size": (224, 224), "mean": np.array([0.5, 0.25], dtype=np.float32), "n": np.int64(3),
             "path": Path("a/b"), "other": object}
    out = as_json(value)
    assert out["size"] == [224, 224] and out["mean"] == [0.5, 0.25] and out["n"] == 3
    assert out["path"] == "a/b" and out["other"] == str(object)
