"""Tests of detect_abnormal and the kNN database, with a fake fast backbone (plus one real one)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomalib_study import detect, overlays
from anomalib_study.detect import detect_abnormal, load_database, resolve_device
from anomalib_study.errors import DataError, ModelFileError, ParameterError
from anomalib_study.methods import DETECTORS, knn


def _fake_backbone(name="fake", weights_sha256="a" * 64, preprocessing=None, embedding_dim=3):
    return SimpleNamespace(
        name=name,
        weights_sha256=weights_sha256,
        preprocessing=preprocessing or {"resize": 8},
        embedding_dim=embedding_dim,
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
    monkeypatch.setattr(knn, "extract_embeddings", extract_embeddings)
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
    return SimpleNamespace(
        root=tmp_path, images=images, test=test, db=tmp_path / "db", result=tmp_path / "result", anomalies=anomalies
    )


def _run(folders, **options):
    params = dict(
        db_dir=folders.db,
        image_dir=folders.images,
        k=3,
        thres_ratio=0.9,
        result_dir=folders.result,
        num_workers=0,
        progress=False,
    )
    if options.get("method", "knn") != "knn":  # k and thres_ratio are kNN's parameters
        del params["k"], params["thres_ratio"]
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
    assert {"build_database_s", "score_s", "total_s"} <= set(
        config["timings"]
    )  # test images: extracted and scored in one stream
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
    with pytest.raises(ModelFileError, match=r"not a detect \(kNN, PatchCore or .*\) database"):
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
        run = detect_abnormal(
            test,
            db_dir=tmp_path / "db",
            image_dir=images,
            k=2,
            result_dir=tmp_path / "result",
            batch_size=4,
            num_workers=0,
            progress=False,
        )
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
    params = dict(
        db_dir=root / "pc_db",
        image_dir=root / "images",
        method="patchcore",
        image_size=64,
        calibration_fraction=0.2,
        result_dir=root / "result",
        num_workers=0,
        batch_size=8,
        progress=False,
    )
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
    anomalies = [
        _texture(root / "test" / "bad" / "a.png", 200, spot=True),
        _texture(root / "test" / "bad" / "a.jpg", 201, spot=True),
    ]
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
    assert sorted(p.relative_to(overlays).as_posix() for p in overlays.rglob("*.jpg")) == [
        "bad/a_jpg.jpg",
        "bad/a_png.jpg",
    ]
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
    names = overlays.overlay_names([Path("a.png"), Path("b/a.png"), Path("b/a.JPG"), Path("c.bmp")])
    assert [n.as_posix() for n in names] == ["a.jpg", "b/a_png.jpg", "b/a_JPG.jpg", "c.jpg"]


def test_a_database_of_the_first_layout_is_named_and_refused(fake, folders):
    _run(folders)
    meta_path = folders.db / "database.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("method")
    meta_path.write_text(json.dumps({**meta, "format": "anomalib_study.knn_database", "version": 1}))
    with pytest.raises(ModelFileError, match=r"first layout .* no longer reads: delete .* to rebuild it"):
        load_database(folders.db)


# ---------------------------------------------------------------------- real folders: hostile files
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(path: Path) -> Path:
    """A valid PNG header claiming 30000 x 30000 pixels: over PIL's decompression-bomb limit."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
    return path


def _odd_readable_images(folder: Path, source: Image.Image) -> list[Path]:
    """The readable odd images a user's folder holds (16-bit, palette, CMYK, RGBA, EXIF-rotated,
    one pixel, a name with spaces and accents)."""
    folder.mkdir(parents=True, exist_ok=True)
    small = source.convert("RGB").resize((96, 80))
    grey16 = Image.fromarray((np.asarray(small.convert("L"), dtype=np.uint16) * 257))
    paths = [
        folder / "grey16.png",
        folder / "palette.png",
        folder / "cmyk.jpg",
        folder / "rgba.png",
        folder / "rotated.jpg",
        folder / "one_pixel.png",
        folder / "ünï cödé – image.png",
    ]
    grey16.save(paths[0])
    small.convert("P", palette=Image.ADAPTIVE).save(paths[1])
    small.convert("CMYK").save(paths[2])
    small.convert("RGBA").save(paths[3])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    small.save(paths[4], exif=exif)
    small.resize((1, 1)).save(paths[5])
    small.save(paths[6])
    return paths


def _hostile_files(folder: Path, good: Path) -> dict[str, Path]:
    """Unreadable files with image suffixes (each must be skipped or refused, and named)."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = folder / "truncated.jpg"
    Image.open(good).convert("RGB").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (folder / "zero.png").write_bytes(b"")
    (folder / "not_an_image.png").write_text("this is a text file with an image suffix\n")
    _bomb_png(folder / "bomb.png")
    (folder / "dangling.png").symlink_to(folder / "no_such_file.png")
    return {
        name: folder / name for name in ("truncated.jpg", "zero.png", "not_an_image.png", "bomb.png", "dangling.png")
    }


def _silently_ignored(folder: Path) -> None:
    (folder / ".hidden.png").write_bytes(b"not an image, but hidden")
    (folder / ".thumbnails").mkdir()
    (folder / ".thumbnails" / "x.png").write_bytes(b"also hidden")
    (folder / "notes.txt").write_text("not an image file")
    (folder / "scores.csv").write_text("a,b\n")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, real_data):
    """Real MVTec AD bottle images (normal folder and test folder), with odd readable images, a
    symlinked image and folder, hidden and non-image files, and five unreadable files mixed in."""
    import shutil

    root = tmp_path_factory.mktemp("hostile")
    bottle = real_data / "mvtec_ad" / "bottle"
    normals = sorted((bottle / "train" / "good").glob("*.png"))[:8]
    images = root / "images"
    images.mkdir()
    for path in normals:  # small copies keep the test fast; they are still the real pictures
        Image.open(path).convert("RGB").resize((128, 128)).save(images / path.name)
    test = root / "test"
    real_test = [
        sorted((bottle / "test" / "good").glob("*.png"))[0],
        sorted((bottle / "test" / "broken_large").glob("*.png"))[0],
    ]
    test.mkdir()
    readable = []
    for path in real_test:
        target = test / f"{path.parent.name}_{path.name}"
        Image.open(path).convert("RGB").resize((128, 128)).save(target)
        readable.append(target)
    readable += _odd_readable_images(test / "odd", Image.open(readable[0]))
    outside = root / "elsewhere"
    outside.mkdir()
    shutil.copy(readable[0], outside / "linked_target.png")
    (test / "link.png").symlink_to(outside / "linked_target.png")
    (test / "linked_folder").symlink_to(outside, target_is_directory=True)
    readable += [test / "link.png", test / "linked_folder" / "linked_target.png"]
    broken = _hostile_files(test / "broken", readable[0])
    _silently_ignored(test)
    return SimpleNamespace(root=root, images=images, test=test, readable=sorted(readable), broken=broken)


#: small settings of every detection method for the tests on real folders (a new one must add its own)
#: every registered detector, with the settings it declares quick (a new method is in these tests unasked)
SMALL = {name: dict(spec.quick_params) for name, spec in DETECTORS.items()}


def _hostile_run(hostile, tmp_path, method="knn", **options):
    params = dict(
        db_dir=tmp_path / "db",
        image_dir=hostile.images,
        result_dir=tmp_path / "result",
        method=method,
        image_size=64,
        batch_size=8,
        num_workers=0,
        progress=False,
    )
    params.update(SMALL[method])
    params.update(options)
    return detect_abnormal(hostile.test, **params)


@pytest.mark.realdata
@pytest.mark.parametrize("method", sorted(SMALL))
def test_unreadable_test_images_are_skipped_and_listed(hostile, tmp_path, method):
    with pytest.warns(UserWarning, match=r"5 of 16 test image\(s\) could not be read and were skipped .*skipped\.csv"):
        run = _hostile_run(hostile, tmp_path, method=method)
    scored = pd.read_csv(run / "scores.csv")
    assert sorted(scored["path"]) == sorted(str(p) for p in hostile.readable)  # every readable image, nothing else
    assert scored["score"].notna().all()
    skipped = pd.read_csv(run / "skipped.csv").set_index("path")["reason"]
    assert sorted(skipped.index) == sorted(str(p) for p in hostile.broken.values())
    reasons = {name: skipped[str(path)] for name, path in hostile.broken.items()}
    assert "empty (0 bytes)" in reasons["zero.png"]
    assert "cannot be decoded" in reasons["truncated.jpg"] and "cannot be decoded" in reasons["not_an_image.png"]
    assert "too large to decode safely" in reasons["bomb.png"]
    assert "does not exist" in reasons["dangling.png"]
    config = json.loads((run / "config.json").read_text())
    assert config["n_found"] == 16 and config["n_test"] == 11 and config["n_skipped"] == 5
    assert config["skipped_list"] == "skipped.csv" and config["strict"] is False
    assert not any(".hidden" in p or ".thumbnails" in p or p.endswith((".txt", ".csv")) for p in scored["path"])


@pytest.mark.realdata
def test_strict_refuses_before_any_work_naming_every_broken_file(hostile, tmp_path):
    with pytest.raises(DataError) as caught:
        _hostile_run(hostile, tmp_path, strict=True)
    message = str(caught.value)
    assert message.startswith("5 image(s) in test_dir") and "strict=True" in message
    for path in hostile.broken.values():
        assert str(path) in message
    assert not (tmp_path / "db").exists() and not (tmp_path / "result").exists()  # no work done


@pytest.mark.realdata
def test_unreadable_normal_images_refused_unless_skipped(hostile, tmp_path):
    import shutil

    normal = tmp_path / "normal"
    shutil.copytree(hostile.images, normal)
    (normal / "zero.png").write_bytes(b"")
    (normal / "sub").mkdir()
    (normal / "sub" / "text.jpg").write_text("no image")
    with pytest.raises(DataError) as caught:
        _hostile_run(hostile, tmp_path, image_dir=normal)
    message = str(caught.value)
    assert "2 image(s) in image_dir" in message and "no database was built" in message
    assert "zero.png" in message and "text.jpg" in message and "--skip-unreadable-normal" in message
    assert not (tmp_path / "db").exists() and not (tmp_path / "result").exists()

    with pytest.warns(UserWarning, match=r"2 unreadable normal image\(s\) .* left out of the database"):
        run = _hostile_run(hostile, tmp_path, image_dir=normal, skip_unreadable_normal=True)
    stored = json.loads((tmp_path / "db" / "database.json").read_text())
    assert stored["n_images"] == 8 and stored["n_skipped_images"] == 2
    assert {entry["path"] for entry in stored["skipped_images"]} == {"zero.png", "sub/text.jpg"}
    assert json.loads((run / "config.json").read_text())["n_bank"] == 8
    second = _hostile_run(hostile, tmp_path, image_dir=normal)  # the recorded skips do not make it stale
    assert json.loads((second / "config.json").read_text())["database_built"] is False
    (normal / "zero.png").write_bytes((normal / "000.png").read_bytes())  # repaired: now the folder changed
    with pytest.raises(ModelFileError, match=r"stale database: 0 image\(s\) added, 0 removed, 1 changed"):
        _hostile_run(hostile, tmp_path, image_dir=normal)


@pytest.mark.realdata
def test_nothing_readable_is_a_clear_error(hostile, tmp_path):
    only_broken = tmp_path / "only_broken"
    _hostile_files(only_broken, hostile.readable[0])
    with pytest.raises(DataError, match=r"5 image\(s\) in test_dir .* nothing was scored"):
        detect_abnormal(
            only_broken,
            db_dir=tmp_path / "db",
            image_dir=hostile.images,
            k=3,
            image_size=64,
            result_dir=tmp_path / "result",
            num_workers=0,
            progress=False,
        )
    assert list((tmp_path / "result").iterdir()) == []  # the partial run folder is gone


def test_hidden_and_non_image_files_are_ignored_everywhere(fake, folders):
    _silently_ignored(folders.images)
    _silently_ignored(folders.test)
    run = _run(folders)
    stored = json.loads((folders.db / "database.json").read_text())
    assert stored["n_images"] == 12 and not any(e["path"].startswith(".") for e in stored["images"])
    assert len(pd.read_csv(run / "scores.csv")) == 6
    (folders.images / ".another_hidden.png").write_bytes(b"x")  # still not stale: hidden files do not count
    assert json.loads((_run(folders) / "config.json").read_text())["database_built"] is False


def test_scoring_streams_in_bounded_chunks(fake, folders, monkeypatch):
    """No call scores more than CHUNK_IMAGES images: memory does not grow with the folder."""

    from anomalib_study import methods
    from anomalib_study.methods import SPECS

    rng = np.random.default_rng(1)
    for i in range(23):
        _image(folders.test / "many" / f"m{i:02d}.png", _greyish(rng))
    monkeypatch.setattr(detect, "CHUNK_IMAGES", 5)
    seen = []
    score_paths = SPECS["knn"].score_paths

    def spy(model, backbone, paths, run, errors):
        seen.append(len(paths))
        return score_paths(model, backbone, paths, run, errors)

    entry, original = methods.REGISTRY["knn"], SPECS["knn"]
    methods.register(entry, original.replace(score_paths=spy), replace=True)
    try:
        run = _run(folders)
    finally:
        methods.register(entry, original, replace=True)
    assert seen == [5, 5, 5, 5, 5, 4] and sum(seen) == 29
    table = pd.read_csv(run / "scores.csv")
    assert len(table) == 29 and table["score"].notna().all()


def _never(*args):
    pytest.fail("a hook the stream must not call was called")


def test_kept_maps_are_bounded_by_max_overlays():
    """The stream keeps the maps of the max_overlays highest-scoring flagged images only."""
    from anomalib_study.methods.base import MethodSpec, RunOptions

    scores = np.array([0.1, 5.0, 3.0, 9.0, 0.2, 7.0, 4.0, 8.0, 6.0, 0.3])
    spec = MethodSpec(
        name="toy",
        label="toy",
        estimator=object,
        description="",
        params=(),
        fit_paths=_never,
        describe=_never,
        check_loaded=_never,
        n_images=_never,
        produces_maps=True,
        score_paths=lambda model, backbone, paths, run, errors: {
            "image_scores": scores[[int(p) for p in paths]],
            "anomaly_maps": np.stack([np.full((2, 2), float(p)) for p in paths]),
        },
    )
    model = SimpleNamespace(threshold_=1.0)
    old = detect.CHUNK_IMAGES
    detect.CHUNK_IMAGES = 3
    try:
        out = detect._score_stream(spec, model, None, [str(i) for i in range(10)], RunOptions(), 3, False)
    finally:
        detect.CHUNK_IMAGES = old
    assert sorted(out.kept_maps) == [3, 5, 7]  # 9.0, 8.0, 7.0
    assert all(out.kept_maps[i][0, 0] == i for i in out.kept_maps)
    assert out.vmin == 0.0 and out.vmax == 9.0 and np.array_equal(out.scores, scores)


# ---------------------------------------------------------------------- interrupted runs
_CHILD = r"""
import sys, time
from pathlib import Path
from types import SimpleNamespace
import numpy as np
from PIL import Image
from anomalib_study import detect
from anomalib_study.methods import knn

root, mode = Path(sys.argv[1]), sys.argv[2]

def load_backbone(name, weights=None, device="cpu"):
    return SimpleNamespace(name=name, weights_sha256="a" * 64, preprocessing={"resize": 8}, embedding_dim=3)

def extract_embeddings(backbone, paths, **options):
    which = "normal" if options.get("desc") == "normal images" else "test"
    if mode == f"slow_{which}":
        (root / f"started_{which}").write_text("x")
        time.sleep(120)  # killed here
    return np.array([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).mean(axis=(0, 1)) for p in paths])

detect.load_backbone = load_backbone
knn.extract_embeddings = extract_embeddings
detect.CHUNK_IMAGES = 2
run = detect.detect_abnormal(root / "test", db_dir=root / "db", image_dir=root / "images", k=3, thres_ratio=0.9,
                             result_dir=root / "result", num_workers=0, progress=False)
print(run)
"""


def _child(root: Path, mode: str):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _kill_when_started(process, marker: Path) -> None:
    import time

    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the child never reached the slow step"
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=30)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_run_killed_while_scoring_leaves_earlier_results_and_database_intact(folders):
    first = _child(folders.root, "full")
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    earlier = Path(out.strip())
    before_run, before_db = _snapshot(earlier), _snapshot(folders.db)

    second = _child(folders.root, "slow_test")
    _kill_when_started(second, folders.root / "started_test")

    assert _snapshot(earlier) == before_run and _snapshot(folders.db) == before_db
    finished = [p for p in folders.result.iterdir() if not p.name.startswith(".")]
    assert finished == [earlier]  # nothing that looks like a result was left by the killed run
    partial = [p for p in folders.result.iterdir() if p.name.startswith(".")]
    assert len(partial) == 1 and partial[0].name.endswith(".partial")
    assert not (partial[0] / "config.json").exists()
    assert load_database(folders.db).metadata["n_images"] == 12


@pytest.mark.slow
def test_build_killed_halfway_leaves_no_database_and_the_next_call_rebuilds(folders):
    building = _child(folders.root, "slow_normal")
    _kill_when_started(building, folders.root / "started_normal")
    assert not (folders.db / "database.json").exists()
    with pytest.raises(ModelFileError, match="not a detect database"):
        load_database(folders.db)
    again = _child(folders.root, "full")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    config = json.loads((Path(out.strip()) / "config.json").read_text())
    assert config["database_built"] is True and config["n_test"] == 6


def test_without_image_dir_a_new_database_asks_for_it_and_a_reused_one_is_used_unchecked(fake, folders, monkeypatch):
    elsewhere = folders.root / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no "images" folder here: the default does not exist
    with pytest.raises(DataError, match=r"no database in .*db \(database\.json missing\).*pass --image-dir"):
        detect_abnormal(folders.test, db_dir=folders.db, result_dir=folders.result, num_workers=0, progress=False)
    _run(folders)  # built from image_dir
    with pytest.warns(UserWarning, match=r"used without checking .* pass --image-dir \(image_dir=\) to check them"):
        run = detect_abnormal(folders.test, db_dir=folders.db, result_dir=folders.result, num_workers=0, progress=False)
    config = json.loads((run / "config.json").read_text())
    assert config["database_built"] is False and config["image_dir"] is None


@pytest.mark.slow
def test_a_second_process_on_one_database_folder_waits_and_is_told_who_holds_it(fake, folders, capsys):
    from conftest import hold_lock

    child = hold_lock(folders.db.parent / f".{folders.db.name}.lock", 2)
    try:
        run = _run(folders)  # waits for the holder, then builds the database
    finally:
        child.wait(timeout=30)
    err = capsys.readouterr().err
    assert f"the database folder {folders.db} is in use by process {child.pid}" in err
    assert "waiting for it to finish" in err
    assert json.loads((run / "config.json").read_text())["database_built"] is True
