"""Tests of anomalib_study.data.readers on tiny generated trees (known counts) and on the real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_study.data import LAYOUTS, load_dataset, load_mask
from anomalib_study.data.readers import seeded_split
from anomalib_study.errors import DataError, ParameterError


def img(path: Path, value: int = 100, size=(32, 32), mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def mask(path: Path, box=(4, 4, 10, 10), size=(32, 32), value=255) -> Path:
    array = np.zeros((size[1], size[0]), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        array[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _assert_no_anomaly_in_train(dataset):
    assert all(r.label == 0 and r.split == "train" for r in dataset.train)
    assert all(r.split == "test" for r in dataset.test)


# ------------------------------------------------------------------ MVTec AD


def make_mvtec(root: Path, with_gt=True):
    cat = root / "widget"
    for i in range(3):
        img(cat / "train" / "good" / f"{i:03d}.png")
    img(cat / "test" / "good" / "000.png")
    for i in range(2):
        img(cat / "test" / "crack" / f"{i:03d}.PNG")
        if with_gt:
            mask(cat / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return root


def test_mvtec_ad(tmp_path):
    ds = load_dataset("mvtec_ad", make_mvtec(tmp_path), "widget")
    assert ds.name == "mvtec_ad/widget" and len(ds.train) == 3 and len(ds.test) == 3
    assert [r.defect_type for r in ds.test] == ["crack", "crack", "good"]
    assert [r.label for r in ds.test] == [1, 1, 0]
    assert ds.has_masks and load_mask(ds.test[0]).sum() == 36
    _assert_no_anomaly_in_train(ds)
    # the category folder itself works as root
    assert load_dataset("mvtec_ad", tmp_path / "widget").name == "mvtec_ad/widget"


def test_mvtec_ad_without_ground_truth(tmp_path):
    ds = load_dataset("mvtec_ad", make_mvtec(tmp_path, with_gt=False), "widget")
    assert not ds.has_masks and any("ground_truth" in n for n in ds.notes)


def test_mvtec_ad_wrong_layout_says_what_was_expected(tmp_path):
    img(tmp_path / "widget" / "train" / "ok" / "0.png")
    with pytest.raises(DataError, match=r"widget/train/good"):
        load_dataset("mvtec_ad", tmp_path)
    with pytest.raises(DataError, match="category folder"):
        load_dataset("mvtec_ad", make_mvtec(tmp_path / "x"), "nope")


# ------------------------------------------------------------------ MVTec LOCO


def test_mvtec_loco_official_masks_and_validation(tmp_path):
    cat = tmp_path / "juice"
    for i in range(4):
        img(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        img(cat / "validation" / "good" / f"{i:03d}.png")
    img(cat / "test" / "logical_anomalies" / "000.png")
    img(cat / "test" / "structural_anomalies" / "000.png")
    # official form: a folder of per-defect masks with defect-specific grey values
    mask(cat / "ground_truth" / "logical_anomalies" / "000" / "000.png", box=(0, 0, 2, 2), value=60)
    mask(cat / "ground_truth" / "logical_anomalies" / "000" / "001.png", box=(30, 30, 32, 32), value=255)
    # flattened form: one PNG per image
    mask(cat / "ground_truth" / "structural_anomalies" / "000.png", box=(0, 0, 1, 1))
    ds = load_dataset("mvtec_loco", tmp_path, "juice")
    assert len(ds.train) == 4 and len(ds.test) == 4
    assert sum(r.label == 0 for r in ds.test) == 2  # validation images are the test normals
    assert any("partial" in n and "validation" in n for n in ds.notes)
    logical = next(r for r in ds.test if r.defect_type == "logical_anomalies")
    assert Path(logical.mask_path).is_dir() and load_mask(logical).sum() == 8  # union, threshold 0
    structural = next(r for r in ds.test if r.defect_type == "structural_anomalies")
    assert load_mask(structural).sum() == 1


# ------------------------------------------------------------------ MVTec 3D


def test_mvtec_3d(tmp_path):
    cat = tmp_path / "tire"
    for i in range(3):
        img(cat / "train" / "good" / "rgb" / f"{i:03d}.png")
    img(cat / "validation" / "good" / "rgb" / "000.png")
    img(cat / "test" / "good" / "rgb" / "000.png")
    mask(cat / "test" / "good" / "gt" / "000.png", box=None)
    img(cat / "test" / "cut" / "rgb" / "000.png")
    mask(cat / "test" / "cut" / "gt" / "000.png")
    (cat / "test" / "cut" / "xyz").mkdir()
    ds = load_dataset("mvtec_3d", tmp_path, "tire")
    assert (len(ds.train), len(ds.test)) == (3, 2)  # validation ignored while test/good exists
    assert ds.has_masks and ds.defect_types == ["cut"]


# ------------------------------------------------------------------ DAGM


def make_dagm_label_images(root: Path):
    cls = root / "Class1"
    for i in range(1, 5):
        img(cls / "Train" / f"{i:04d}.PNG")
        img(cls / "Test" / f"{i:04d}.PNG")
    mask(cls / "Train" / "Label" / "0002_label.PNG")
    mask(cls / "Test" / "Label" / "0003_label.PNG")
    (cls / "Train" / "Label" / "Labels.txt").write_text(
        "1\n1\t0\t0001.PNG\t0\t0\n2\t1\t0002.PNG\t0\t0002_label.PNG\n3\t0\t0003.PNG\t0\t0\n4\t0\t0004.PNG\t0\t0\n"
    )
    (cls / "Test" / "Label" / "Labels.txt").write_text(
        "1\n1\t0\t0001.PNG\t0\t0\n2\t0\t0002.PNG\t0\t0\n3\t1\t0003.PNG\t0\t0003_label.PNG\n4\t0\t0004.PNG\t0\t0\n"
    )
    return root


def test_dagm_label_image_form(tmp_path):
    ds = load_dataset("dagm", make_dagm_label_images(tmp_path), "Class1")
    assert ds.name == "dagm/Class1" and not ds.synthetic
    assert len(ds.train) == 3  # the defective Train image went to test
    assert len(ds.test) == 5 and sum(r.label for r in ds.test) == 2
    _assert_no_anomaly_in_train(ds)
    defect = next(r for r in ds.test if r.label == 1 and "Train" in str(r.path))
    assert defect.defect_type == "defect" and load_mask(defect).sum() == 36


def test_dagm_ellipse_form_rasterises_into_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ANOMALIB_STUDY_CACHE", str(cache))
    for c in (1, 2):
        cls = tmp_path / "data" / f"Class{c}"
        for i in range(1, 4):
            img(cls / "Train" / f"{i:04d}.PNG")
            img(cls / "Test" / f"{i:04d}.PNG")
        (cls / "Train" / "Label").mkdir()
        (cls / "Train" / "Label" / "Labels.txt").write_text("")
        (cls / "Test" / "Label").mkdir()
        # image 2 has two defects (two lines): the mask is their union
        (cls / "Test" / "Label" / "Labels.txt").write_text("2\t6\t2\t0\t10\t10\n2\t3\t3\t0\t25\t25\n")
    ds = load_dataset("dagm", tmp_path / "data")
    assert ds.name == "dagm" and len(ds.train) == 6 and len(ds.test) == 6
    defects = [r for r in ds.test if r.label == 1]
    assert len(defects) == 2 and all(Path(r.mask_path).parent == cache / "dagm_masks" for r in defects)
    m = load_mask(defects[0])
    assert m[10, 5] and m[10, 15] and not m[10, 2] and not m[4, 10] and m[25, 25] and not m[0, 0]
    assert len(list((cache / "dagm_masks").glob("*.png"))) == 1  # same label + size -> one file


def test_dagm_bad_label_line(tmp_path):
    root = make_dagm_label_images(tmp_path)
    (root / "Class1" / "Test" / "Label" / "Labels.txt").write_text("1\nthis is wrong\n")
    with pytest.raises(DataError, match=r"Labels.txt, line 2"):
        load_dataset("dagm", root)
    with pytest.raises(DataError, match="Class1, .*Class2"):
        load_dataset("dagm", img(tmp_path / "other" / "x.png").parent)


# ------------------------------------------------------------------ Magnetic-tile


def make_magnetic(root: Path, listed=True):
    for i in range(5):
        img(root / "MT_Free" / "Imgs" / f"f{i}.jpg")
        mask(root / "MT_Free" / "Imgs" / f"f{i}.png", box=None)
    for kind, n in (("Blowhole", 2), ("Crack", 1)):
        for i in range(n):
            img(root / f"MT_{kind}" / "Imgs" / f"{kind}{i}.jpg")
            mask(root / f"MT_{kind}" / "Imgs" / f"{kind}{i}.png", value=200)
    if listed:
        (root / "mtd_train_filenames.txt").write_text("f0.jpg\nf2.jpg\nf3.jpg\n")
    return root


def test_magnetic_tile_split_file(tmp_path):
    ds = load_dataset("magnetic_tile", make_magnetic(tmp_path))
    assert sorted(r.path.name for r in ds.train) == ["f0.jpg", "f2.jpg", "f3.jpg"]
    assert len(ds.test) == 5 and ds.defect_types == ["blowhole", "crack"]
    assert ds.has_masks and load_mask(next(r for r in ds.test if r.label)).sum() == 36


def test_magnetic_tile_seeded_split(tmp_path):
    ds = load_dataset("magnetic_tile", make_magnetic(tmp_path, listed=False), seed=3)
    assert len(ds.train) == 4 and len(ds.test) == 4  # round(0.8 * 5) = 4
    again = load_dataset("magnetic_tile", tmp_path, seed=3)
    assert [r.path for r in again.train] == [r.path for r in ds.train]
    assert any("seeded split" in n for n in ds.notes)


# ------------------------------------------------------------------ KolektorSDD


def test_kolektorsdd_splits_by_part(tmp_path):
    for p in range(1, 11):
        part = tmp_path / f"kos{p:02d}"
        for i in range(3):
            img(part / f"Part{i}.jpg")
            defective = p == 2 and i == 1
            lbl = Image.new("1", (32, 32))
            if defective:
                lbl.putpixel((3, 3), 1)
            lbl.save(part / f"Part{i}_label.bmp")
    ds = load_dataset("kolektorsdd", tmp_path, seed=0)
    assert len(ds.train) + len(ds.test) == 30 and sum(r.label for r in ds.test) == 1
    train_parts = {r.path.parent.name for r in ds.train}
    test_normal_parts = {r.path.parent.name for r in ds.test if r.label == 0}
    assert not train_parts & test_normal_parts and len(train_parts) == 8
    defect = next(r for r in ds.test if r.label)
    assert defect.mask_threshold == 0 and load_mask(defect).sum() == 1
    assert any("kos26" in n for n in ds.notes)


# ------------------------------------------------------------------ NEU-DET, folder, OOD


def test_neu_det(tmp_path):
    for kind in ("crazing", "rolled-in_scale"):
        for i in (1, 2, 10):
            img(tmp_path / "IMAGES" / f"{kind}_{i}.jpg")
    ds = load_dataset("neu_det", tmp_path)
    assert ds.train == [] and len(ds.test) == 6 and all(r.label == 1 for r in ds.test)
    assert ds.defect_types == ["crazing", "rolled-in_scale"]


def test_folder_layout(tmp_path):
    for i in range(10):
        img(tmp_path / "good" / f"{i}.png")
    img(tmp_path / "normal" / "sub" / "x.png")
    img(tmp_path / "anomalous" / "scratch" / "a.png")
    img(tmp_path / "anomalous" / "dent" / "b.png")
    ds = load_dataset("folder", tmp_path)
    assert len(ds.train) == 8 and len(ds.test) == 4 and ds.defect_types == ["dent", "scratch"]
    both = load_dataset("folder", tmp_path, normal=("good", "normal"), train_fraction=0.5)
    assert len(both.train) + sum(r.label == 0 for r in both.test) == 11
    other = load_dataset("folder", tmp_path, seed=1)
    assert [r.path for r in other.train] != [r.path for r in ds.train]
    with pytest.raises(ParameterError, match="train_fraction"):
        load_dataset("folder", tmp_path, train_fraction=1.5)
    with pytest.raises(ParameterError, match="its options are"):
        load_dataset("folder", tmp_path, train_fracton=0.5)


def test_ood_layout(tmp_path):
    make_magnetic(tmp_path / "magnetic_tile")
    for i in range(1, 6):
        img(tmp_path / "neu_det" / "IMAGES" / f"crazing_{i}.jpg")
    make_mvtec(tmp_path / "mvtec_ad")
    ds = load_dataset("ood", tmp_path, max_per_source=3)
    assert len(ds.train) == 3
    counts = ds.summary()["test_counts"]
    assert counts == {"good": 2, "neu_det": 3, "mvtec_ad": 3}
    assert any("kolektorsdd missing" in n for n in ds.notes)


def test_seeded_split_rule():
    train, test = seeded_split(list("abcdefghij"), seed=0, train_fraction=0.8)
    order = np.random.default_rng(0).permutation(10)
    assert train == sorted("abcdefghij"[i] for i in order[:8]) and len(test) == 2


# ------------------------------------------------------------------ general errors


def test_unknown_layout_lists_known_ones(tmp_path):
    with pytest.raises(DataError, match="mvtec_ad"):
        load_dataset("mvtec", tmp_path)
    assert {
        "mvtec_ad",
        "mvtec_loco",
        "mvtec_3d",
        "dagm",
        "magnetic_tile",
        "kolektorsdd",
        "neu_det",
        "folder",
        "ood",
    } <= set(LAYOUTS)


def test_missing_and_empty_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mvtec_ad", tmp_path / "nope")
    with pytest.raises(DataError, match="empty"):
        load_dataset("kolektorsdd", tmp_path)


def test_images_sorted_and_extensions_case_insensitive(tmp_path):
    for name in ("b.JPG", "a.jpeg", "c.Tif", "d.bmp", "notes.txt"):
        img(tmp_path / "good" / name) if name != "notes.txt" else (tmp_path / "good" / name).write_text("x")
    img(tmp_path / "anomalous" / "x" / "e.TIFF")
    ds = load_dataset("folder", tmp_path, train_fraction=0.5)
    paths = [r.path.name for r in ds.train + ds.test if r.label == 0]
    assert sorted(paths) == ["a.jpeg", "b.JPG", "c.Tif", "d.bmp"]
    assert [r.path for r in ds.train] == sorted(r.path for r in ds.train)


# ------------------------------------------------------------------ real data (quick: listing only)


@pytest.mark.realdata
def test_real_magnetic_tile(real_data):
    ds = load_dataset("magnetic_tile", real_data / "magnetic_tile")
    assert (len(ds.train), len(ds.test)) == (761, 583)
    assert sum(r.label == 0 for r in ds.test) == 191 and ds.has_masks


@pytest.mark.realdata
def test_real_mvtec_ad(real_data):
    bottle = load_dataset("mvtec_ad", real_data / "mvtec_ad", "bottle")
    assert (len(bottle.train), len(bottle.test)) == (209, 83)
    assert sum(r.mask_path is not None for r in bottle.test) == 63 and bottle.has_masks
    transistor = load_dataset("mvtec_ad", real_data / "mvtec_ad", "transistor")
    assert (len(transistor.train), len(transistor.test)) == (213, 100) and not transistor.has_masks


@pytest.mark.realdata
def test_real_mvtec_loco(real_data):
    ds = load_dataset("mvtec_loco", real_data / "mvtec_loco", "juice_bottle")
    assert len(ds.train) == 335 and sum(r.label == 0 for r in ds.test) == 54
    assert sum(r.label for r in ds.test) == 142 and ds.has_masks
    assert "validation" in str(ds.test[0].path) and any("partial" in n for n in ds.notes)
    assert load_mask(next(r for r in ds.test if r.label)).any()


@pytest.mark.realdata
def test_real_mvtec_3d(real_data):
    ds = load_dataset("mvtec_3d", real_data / "mvtec_3d", "tire")
    assert len(ds.train) == 210 and len(ds.test) == 112
    assert ds.summary()["test_counts"] == {"combined": 5, "contamination": 28, "cut": 27, "good": 25, "hole": 27}
    assert ds.has_masks


@pytest.mark.realdata
def test_real_kolektorsdd(real_data):
    ds = load_dataset("kolektorsdd", real_data / "kolektorsdd")
    assert len(ds.train) + len(ds.test) == 399 and sum(r.label for r in ds.test) == 52
    assert not {r.path.parent.name for r in ds.train} & {r.path.parent.name for r in ds.test if r.label == 0}


@pytest.mark.realdata
def test_real_neu_det(real_data):
    ds = load_dataset("neu_det", real_data / "neu_det")
    assert len(ds.test) == 600 and len(ds.defect_types) == 6 and ds.train == []


@pytest.mark.realdata
def test_real_ood(real_data):
    ds = load_dataset("ood", real_data)
    counts = ds.summary()["test_counts"]
    assert len(ds.train) == 761 and counts == {"good": 191, "neu_det": 100, "kolektorsdd": 100, "mvtec_ad": 100}
