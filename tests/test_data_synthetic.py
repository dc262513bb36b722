"""Tests of anomalib_study.data.synthetic: layout, determinism, stamp reuse, masks over the defects."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from anomalib_study.data import load_dataset, load_image, load_mask, make_synthetic_dagm
from anomalib_study.errors import DataError, ParameterError

SMALL = dict(n_classes=2, n_train=4, n_test_normal=2, n_test_defect=3, image_size=64)


def _bytes_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_counts_and_reader(tmp_path):
    start = time.perf_counter()
    root = make_synthetic_dagm(tmp_path / "syn", seed=1)
    assert time.perf_counter() - start < 5.0
    ds = load_dataset("dagm", root)
    assert ds.synthetic and ds.name == "synthetic_dagm" and any("synthetic" in n for n in ds.notes)
    assert len(ds.train) == 3 * 24 and len(ds.test) == 3 * 20
    assert sum(r.label for r in ds.test) == 3 * 12
    assert set(ds.defect_types) == {"scratch", "blob", "spot"}
    one = load_dataset("dagm", root, "Class2")
    assert one.name == "synthetic_dagm/Class2" and len(one.train) == 24
    assert (root / "Class1" / "Test" / "Label" / "Labels.txt").read_text().count("\n") == 12


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _bytes_of(make_synthetic_dagm(tmp_path / "a", seed=5, **SMALL))
    b = _bytes_of(make_synthetic_dagm(tmp_path / "b", seed=5, **SMALL))
    c = _bytes_of(make_synthetic_dagm(tmp_path / "c", seed=6, **SMALL))
    assert a == b and a != c


def test_stamp_skips_regeneration_and_params_rebuild(tmp_path):
    root = make_synthetic_dagm(tmp_path / "s", **SMALL)
    marker = root / "Class1" / "Train" / "0001.PNG"
    before = marker.stat().st_mtime_ns
    make_synthetic_dagm(root, **SMALL)
    assert marker.stat().st_mtime_ns == before  # untouched
    make_synthetic_dagm(root, **{**SMALL, "n_train": 5})
    assert (root / "Class1" / "Train" / "0005.PNG").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_refuses_foreign_folder_and_bad_params(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("do not delete")
    with pytest.raises(DataError, match="not a synthetic"):
        make_synthetic_dagm(tmp_path / "mine")
    with pytest.raises(ParameterError):
        make_synthetic_dagm(tmp_path / "x", n_test_defect=0)


def test_defects_lie_inside_the_labelled_ellipse(tmp_path):
    root = make_synthetic_dagm(tmp_path / "m", seed=2, **SMALL)
    ds = load_dataset("dagm", root)
    for record in (r for r in ds.test if r.label):
        image = np.asarray(load_image(record.path))[..., 0].astype(float)
        mask = load_mask(record)
        assert 10 < mask.sum() < 0.2 * mask.size
        # the defect makes the pixels inside the ellipse depart from a smoothed background
        residual = np.abs(image - ndimage.median_filter(image, size=9))
        assert residual[mask].max() > np.percentile(residual[~mask], 99)
