"""Tests of detect_abnormal and the kNN database, with a fake fast backbone (plus one real one)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomalib_study import detect
from anomalib_study.detect import detect_abnormal, load_database, resolve_device
from anomalib_study.errors import DataError, ModelFileError, ParameterError


def _fake_backbone(name="fake", weights_sha256="a" * 64, preprocessing=None, embedding_dim=3):
    return SimpleNamespace(
        name=name, weights_sha256=weights_sha256, preprocessing=preprocessing or {"resize": 8}, embedding_dim=embedding_dim
    )


@pytest.fixture
def fake(monkeypatch):
    """Replace the backbone by the mean RGB colour of each image; record the calls."""
    state = SimpleNamespace(backbone=_fake_backbone(), loads=[], extracts=[])

    def load_backbone(name, weights=None, device="cpu"):
        state.loads.append((name, weights, device))
        return SimpleNamespace(**{**vars(state.backbone), "name": name})

    def extract_embeddings(backbone, paths, **options):
        state.extracts.append(options)
        return np.array([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).mean(axis=(0, 1)) for p in paths])

    monkeypatch.setattr(detect, "load_backbone", load_backbone)
    monkeypatch.setattr(detect, "extract_embeddings", extract_embeddings)
    return state


def _image(path: Path, colour) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), tuple(int(c) for c in colour)).save(path)
    return path


def _greyish(rng):
    return 100 + rng.integers(0, 20, 3)


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    images, test = tmp_path / "images", tmp_path / "test"
    for i in range(12):
        _image(images / ("sub" if i % 2 else "") / f"n{i:02d}.png", _greyish(rng))
    for i in range(4):
        _image(test / f"good{i}.png", _greyish(rng))
    anomalies = [_image(test / "bad" / "red.png", (220, 10, 10)), _image(test / "bad" / "blue.jpg", (10, 10, 220))]
    return SimpleNamespace(root=tmp_path, images=images, test=test, db=tmp_path / "db", result=tmp_path / "result",
                           anomalies=anomalies)


def _run(folders, **options):
    params = dict(db_dir=folders.db, image_dir=folders.images, k=3, thres_ratio=0.9, result_dir=folders.result,
                  num_workers=0, progress=False)
    params.update(options)
    return detect_abnormal(folders.test, **params)


def test_build_then_detect(fake, folders):
    run = _run(folders)
    assert run.parent == folders.result
    flagged = (run / "abnormal.result").read_text().splitlines()
    assert sorted(flagged) == sorted(str(p) for p in folders.anomalies)
    table = pd.read_csv(run / "scores.csv")
    assert list(table.columns) == ["path", "score", "predicted"] and len(table) == 6
    assert table.loc[table.predicted == 1, "score"].min() > table.loc[table.predicted == 0, "score"].max()
    config = json.loads((run / "config.json").read_text())
    assert config["database_built"] is True
    assert config["backbone"] == "efficientnet_lite0" and config["weights_sha256"] == "a" * 64
    assert config["k"] == 3 and config["k_used"] == 3 and config["thres_ratio"] == 0.9
    assert config["n_bank"] == 12 and config["n_test"] == 6 and config["n_abnormal"] == 2
    assert config["index"]["factory"] == "Flat" and config["index"]["ntotal"] == 12
    assert config["db_dir"] == str(folders.db.resolve())
    assert {"build_database_s", "extract_test_s", "score_s", "total_s"} <= set(config["timings"])
    assert sorted(p.name for p in folders.db.iterdir()) == ["database.json", "knn_model.npz"]
    stored = json.loads((folders.db / "database.json").read_text())
    assert [e["path"] for e in stored["images"]] == sorted(e["path"] for e in stored["images"])
    assert "sub/n01.png" in {e["path"] for e in stored["images"]}
    assert config["threshold"] == stored["knn"]["threshold"]


def test_second_run_reuses_database_in_a_new_folder(fake, folders):
    first = _run(folders)
    second = _run(folders)
    assert first != second and first.exists()
    config = json.loads((second / "config.json").read_text())
    assert config["database_built"] is False and "load_database_s" in config["timings"]
    assert len(fake.extracts) == 3  # bank once, test twice
    pd.testing.assert_frame_equal(pd.read_csv(first / "scores.csv"), pd.read_csv(second / "scores.csv"))


def test_database_values_win_with_warning(fake, folders):
    _run(folders)
    with pytest.warns(UserWarning, match="k=5 ignored: the database .* was built with k=3"):
        run = _run(folders, k=5)
    assert json.loads((run / "config.json").read_text())["k_used"] == 3
    with pytest.warns(UserWarning, match="model_name='other' ignored"):
        _run(folders, model_name="other")
    assert fake.loads[-1][0] == "efficientnet_lite0"  # the database's backbone was loaded


def test_stale_database_refused(fake, folders):
    _run(folders)
    _image(folders.images / "new.png", (1, 2, 3))
    with pytest.raises(ModelFileError, match=r"stale database: 1 image\(s\) added, 0 removed, 0 changed"):
        _run(folders)
    (folders.images / "new.png").unlink()
    _image(folders.images / "n00.png", (9, 9, 9))
    with pytest.raises(ModelFileError, match=r"0 image\(s\) added, 0 removed, 1 changed .*n00.png.*delete"):
        _run(folders)


def test_backbone_mismatch_refused(fake, folders):
    _run(folders)
    fake.backbone = _fake_backbone(weights_sha256="b" * 64)
    with pytest.raises(ModelFileError, match="weights sha256 aaaaaaaaaaaa"):
        _run(folders)
    fake.backbone = _fake_backbone(preprocessing={"resize": 16})
    with pytest.raises(ModelFileError, match="preprocessing"):
        _run(folders)
    fake.backbone = _fake_backbone(embedding_dim=4)
    with pytest.raises(ModelFileError, match="3-dimensional"):
        _run(folders)


def test_corrupt_foreign_old_database_refused(fake, folders):
    _run(folders)
    meta_path = folders.db / "database.json"
    good = meta_path.read_text()
    meta = json.loads(good)
    meta_path.write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ModelFileError, match="version 99"):
        load_database(folders.db)
    meta_path.write_text(json.dumps({**meta, "format": "something.else"}))
    with pytest.raises(ModelFileError, match=r"not a detect \(kNN or PatchCore\) database"):
        load_database(folders.db)
    meta_path.write_text("{ not json")
    with pytest.raises(ModelFileError, match="corrupt"):
        _run(folders)
    meta_path.write_text(good)
    (folders.db / "knn_model.npz").write_bytes(b"swapped")
    with pytest.raises(ModelFileError, match="sha256 differs"):
        load_database(folders.db)


def test_empty_folders(fake, folders, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="test_dir .*empty holds no image files"):
        detect_abnormal(tmp_path / "empty", db_dir=folders.db, image_dir=folders.images, result_dir=folders.result)
    with pytest.raises(DataError, match="image_dir .*empty holds no image files"):
        _run(folders, image_dir=tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        detect_abnormal(tmp_path / "missing", db_dir=folders.db, image_dir=folders.images)
    assert not folders.result.exists()  # nothing written on failure


def test_k_clamped_and_workers_clamped(fake, folders):
    with pytest.warns(UserWarning, match="using k=11"):
        run = _run(folders, k=100, num_workers=10_000)
    config = json.loads((run / "config.json").read_text())
    assert config["k_used"] == 11 and any("k=11" in w for w in config["warnings"])
    assert 1 <= fake.extracts[0]["num_workers"] <= 10_000 and config["num_workers"] == fake.extracts[0]["num_workers"]
    assert config["num_workers"] < 10_000


def test_bad_parameters(fake, folders):
    with pytest.raises(ParameterError, match="thres_ratio"):
        _run(folders, thres_ratio=1.5)
    with pytest.raises(ParameterError, match="k must be >= 1"):
        _run(folders, k=0)


def test_resolve_device():
    import torch

    assert resolve_device(False) == "cpu"
    with pytest.raises(ParameterError, match="gpu must be"):
        resolve_device(-1)
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="no CUDA device is available"):
            resolve_device(True)
        with pytest.raises(ParameterError, match="no CUDA"):
            resolve_device(1)
    else:
        assert resolve_device(True) == "cuda" and resolve_device(0) == "cuda:0"


def test_real_efficientnet_lite0(tmp_path):
    """End to end with the real backbone on a few tiny generated images."""
    pytest.importorskip("anomalib_study.backbones")
    from anomalib_study.errors import WeightsError

    rng = np.random.default_rng(0)
    images, test = tmp_path / "images", tmp_path / "test"
    for i in range(5):
        _image(images / f"n{i}.png", _greyish(rng))
    _image(test / "good.png", _greyish(rng))
    _image(test / "red.png", (230, 0, 0))
    try:
        run = detect_abnormal(test, db_dir=tmp_path / "db", image_dir=images, k=2, result_dir=tmp_path / "result",
                              batch_size=4, num_workers=0, progress=False)
    except WeightsError as error:
        pytest.skip(f"efficientnet_lite0 weights not installed: {error}")
    table = pd.read_csv(run / "scores.csv").set_index("path")
    assert table.loc[str(test / "red.png"), "score"] > table.loc[str(test / "good.png"), "score"]
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"] == "efficientnet_lite0" and len(config["weights_sha256"]) == 64
    assert config["embedding_dim"] == config["index"]["dim"]


# ---------------------------------------------------------------------- PatchCore
def _texture(path: Path, seed: int, spot: bool = False) -> Path:
    """48 x 48 grey noise; ``spot``: a bright 16 x 16 square in the middle (the anomaly)."""
    rng = np.random.default_rng(seed)
    pixels = (120 + rng.normal(0, 10, (48, 48, 3))).clip(0, 255)
    if spot:
        pixels[16:32, 16:32] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def _pc_run(root: Path, **options):
    params = dict(db_dir=root / "pc_db", image_dir=root / "images", method="patchcore", image_size=64,
                  calibration_fraction=0.2, result_dir=root / "result", num_workers=0, batch_size=8, progress=False)
    params.update(options)
    return detect_abnormal(root / "test", **params)


@pytest.fixture(scope="module")
def patchcore_built(tmp_path_factory):
    """A PatchCore database built once (real efficientnet_lite0 at 64 px) and its first run."""
    from anomalib_study.errors import WeightsError

    root = tmp_path_factory.mktemp("patchcore")
    for i in range(10):
        _texture(root / "images" / f"n{i}.png", i)
    for i in range(3):
        _texture(root / "test" / f"good{i}.png", 100 + i)
    anomalies = [_texture(root / "test" / "bad" / "a.png", 200, spot=True),
                 _texture(root / "test" / "bad" / "a.jpg", 201, spot=True)]
    try:
        run = _pc_run(root)
    except WeightsError as error:
        pytest.skip(f"efficientnet_lite0 weights not installed: {error}")
    return SimpleNamespace(root=root, run=run, anomalies=anomalies)


def test_patchcore_build_flags_the_odd_images_and_writes_overlays(patchcore_built):
    run, root = patchcore_built.run, patchcore_built.root
    flagged = (run / "abnormal.result").read_text().splitlines()
    assert sorted(flagged) == sorted(str(p) for p in patchcore_built.anomalies)
    table = pd.read_csv(run / "scores.csv")
    assert list(table.columns) == ["path", "score", "predicted"] and len(table) == 5
    assert table.loc[table.predicted == 1, "score"].min() > table.loc[table.predicted == 0, "score"].max()
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "patchcore" and config["database_built"] is True
    assert config["backbone"] == "efficientnet_lite0" and len(config["weights_sha256"]) == 64
    assert config["image_size"] == 64 and config["coreset_ratio"] == 0.1 and config["thres_ratio"] == 0.99
    assert config["n_calibration"] == 2 and config["n_train_images"] == 10
    assert 0 < config["memory_bank_size"] == config["n_bank"] <= config["n_train_patches"] // 10 + 1
    assert config["n_abnormal"] == 2 and "build_database_s" in config["timings"]
    stored = json.loads((root / "pc_db" / "database.json").read_text())
    assert stored["method"] == "patchcore" and stored["model_file"] == "patchcore_model.npz"
    assert config["threshold"] == stored["patchcore"]["threshold"]
    assert sorted(p.name for p in (root / "pc_db").iterdir()) == ["database.json", "patchcore_model.npz"]
    # one overlay per flagged image; a.png and a.jpg share a stem, so both keep their extension
    overlays = run / "overlays"
    assert sorted(p.relative_to(overlays).as_posix() for p in overlays.rglob("*.jpg")) == ["bad/a_jpg.jpg", "bad/a_png.jpg"]
    assert config["overlays"]["count"] == 2 and config["overlays"]["vmin"] < config["overlays"]["vmax"]
    listing = pd.read_csv(overlays / "overlays.csv")
    assert set(listing["overlay"]) == {"bad/a_jpg.jpg", "bad/a_png.jpg"}
    picture = np.asarray(Image.open(overlays / "bad" / "a_png.jpg").convert("RGB"), dtype=float)
    assert picture.shape == (64, 64, 3)
    centre, corner = picture[28:36, 28:36], picture[:8, :8]  # jet: hot = red, cold = blue
    assert centre[..., 0].mean() - centre[..., 2].mean() > corner[..., 0].mean() - corner[..., 2].mean() + 50


def test_patchcore_second_run_loads_the_database_in_a_new_folder(patchcore_built):
    with pytest.warns(UserWarning, match="coreset_ratio=0.5 ignored"):
        second = _pc_run(patchcore_built.root, coreset_ratio=0.5, max_overlays=1)
    assert second != patchcore_built.run and patchcore_built.run.exists()
    config = json.loads((second / "config.json").read_text())
    assert config["database_built"] is False and "load_database_s" in config["timings"]
    assert config["coreset_ratio"] == 0.1 and config["overlays"]["count"] == 1
    assert [p.name for p in (second / "overlays").rglob("*.jpg")] == ["a_png.jpg"]  # the highest score only
    first = pd.read_csv(patchcore_built.run / "scores.csv")
    np.testing.assert_allclose(pd.read_csv(second / "scores.csv")["score"], first["score"], rtol=1e-5)


def test_database_of_another_method_refused(fake, folders, patchcore_built):
    _run(folders)  # a kNN database
    with pytest.raises(ModelFileError, match="built for method 'knn', not 'patchcore'"):
        _run(folders, method="patchcore")
    with pytest.raises(ModelFileError, match="built for method 'patchcore', not 'knn'"):
        _run(folders, db_dir=patchcore_built.root / "pc_db")
    assert load_database(patchcore_built.root / "pc_db").method == "patchcore"


def test_patchcore_stale_database_refused(patchcore_built, tmp_path):
    import shutil

    for name in ("images", "test", "pc_db"):
        shutil.copytree(patchcore_built.root / name, tmp_path / name)
    _texture(tmp_path / "images" / "n00.png", 999)
    with pytest.raises(ModelFileError, match=r"stale database: 1 image\(s\) added"):
        _pc_run(tmp_path)
    assert not (tmp_path / "result").exists()


def test_patchcore_needs_a_threshold(fake, folders):
    with pytest.raises(ParameterError, match="calibration_fraction"):
        _run(folders, method="patchcore", calibration_fraction=0)
    with pytest.raises(ParameterError, match="method must be one of"):
        _run(folders, method="padim")


def test_overlay_names_unique():
    names = detect._overlay_names([Path("a.png"), Path("b/a.png"), Path("b/a.JPG"), Path("c.bmp")])
    assert [n.as_posix() for n in names] == ["a.jpg", "b/a_png.jpg", "b/a_JPG.jpg", "c.jpg"]


def test_legacy_knn_database_still_read(fake, folders):
    _run(folders)
    meta_path = folders.db / "database.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("method")
    meta_path.write_text(json.dumps({**meta, "format": "anomalib_study.knn_database", "version": 1}))
    assert load_database(folders.db).method == "knn"
    assert json.loads((_run(folders) / "config.json").read_text())["database_built"] is False
