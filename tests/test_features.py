"""Tests of batched extraction and the feature cache, on tiny generated images and a
randomly initialised ResNet-18 (generated weight file, 64 px inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from anomalib_study import features
from anomalib_study.backbones import load_backbone
from anomalib_study.data.decode import load_image
from anomalib_study.errors import DataError, ParameterError
from anomalib_study.features import FeatureCache, extract_embeddings, extract_feature_maps


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return load_backbone("resnet18", weights=path, image_size=64)


def _write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _one_by_one(backbone, paths) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([backbone(backbone.transform(load_image(p))[None])["embedding"].numpy() for p in paths])


def test_rows_follow_the_order_of_paths_with_a_ragged_last_batch(backbone, tmp_path):
    paths = _write_images(tmp_path, 5)
    order = [3, 0, 4, 1, 2]
    result = extract_embeddings(backbone, [paths[i] for i in order], batch_size=2, cache=None, progress=False)
    assert result.shape == (5, 512) and result.dtype == np.float32
    np.testing.assert_allclose(result, _one_by_one(backbone, [paths[i] for i in order]), rtol=1e-4, atol=1e-5)
    assert not np.allclose(result[0], result[1])  # distinct images, distinct rows


def test_cached_rows_equal_uncached_and_skip_decoding(backbone, tmp_path, monkeypatch):
    paths = _write_images(tmp_path, 4)
    cache = FeatureCache(tmp_path / "cache")
    off, computed, read = {}, {}, {}
    uncached = extract_embeddings(backbone, paths, batch_size=3, cache=None, progress=False, record=off)
    first = extract_embeddings(backbone, paths, batch_size=3, cache=cache, progress=False, record=computed)
    np.testing.assert_array_equal(first, uncached)
    assert off == {"feature_cache": "off"}
    key = FeatureCache.model_key(backbone)
    assert computed["feature_cache"]["read"] == 0 and computed["feature_cache"]["computed"] == 4
    assert computed["feature_cache"]["key"] == key and computed["feature_cache"]["read_images"] is None

    def refuse(*_args, **_kwargs):
        raise AssertionError("a cached image was decoded or hashed again")

    monkeypatch.setattr(features, "load_image", refuse)
    monkeypatch.setattr(features, "content_hash", refuse)
    for store in (cache, FeatureCache(tmp_path / "cache")):  # same instance, and a fresh one reading the disk
        second = extract_embeddings(backbone, paths[::-1], cache=store, progress=False, record=read)
        np.testing.assert_array_equal(second, uncached[::-1])
        assert read["feature_cache"] == {
            "read": 4,
            "computed": 0,
            "key": key,
            "read_images": computed["feature_cache"]["computed_images"],  # what the first call stored
            "computed_images": None,
        }


def test_default_cache_lives_under_the_cache_env(backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALIB_STUDY_CACHE", str(tmp_path / "env_cache"))
    paths = _write_images(tmp_path, 2)
    extract_embeddings(backbone, paths, progress=False)  # cache="default"
    assert list((tmp_path / "env_cache" / "features").glob("*/*.npz"))
    assert (tmp_path / "env_cache" / "features" / "content_hashes.json").is_file()


def test_changed_image_bytes_are_a_cache_miss(backbone, tmp_path):
    paths = _write_images(tmp_path, 3)
    cache = FeatureCache(tmp_path / "cache")
    before = extract_embeddings(backbone, paths, cache=cache, progress=False)
    Image.fromarray(np.full((30, 30, 3), 200, dtype=np.uint8)).save(paths[1])
    after = extract_embeddings(backbone, paths, cache=cache, progress=False)
    np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
    assert not np.allclose(after[1], before[1])
    np.testing.assert_allclose(after[1], _one_by_one(backbone, [paths[1]])[0], rtol=1e-4, atol=1e-5)


def test_cache_key_changes_with_weights_and_preprocessing(backbone):
    key = FeatureCache.model_key(backbone)
    assert FeatureCache.model_key(backbone) == key

    class Stub:  # the key depends only on these attributes
        name = backbone.name
        weights_sha256 = backbone.weights_sha256
        preprocessing = dict(backbone.preprocessing)

    assert FeatureCache.model_key(Stub()) == key
    other_weights = Stub()
    other_weights.weights_sha256 = "0" * 64
    other_pre = Stub()
    other_pre.preprocessing = {**backbone.preprocessing, "crop": 96}
    keys = {
        key,
        FeatureCache.model_key(other_weights),
        FeatureCache.model_key(other_pre),
        FeatureCache.model_key(backbone, output="layer2"),
    }
    assert len(keys) == 4


def test_cache_key_moves_with_the_code_that_computes_the_embeddings(backbone, monkeypatch):
    from anomalib_study import features, freshness

    key = FeatureCache.model_key(backbone)
    # the modules' code and the feature libraries' versions, as they were when features was imported
    assert features.EXTRACTION_CODE == freshness.code_version(features.EXTRACTION_MODULES, libraries=True)
    assert FeatureCache.key_fields(backbone)["code"] == features.EXTRACTION_CODE
    monkeypatch.setattr(features, "EXTRACTION_CODE", "another version")  # an edited module, an upgrade
    assert FeatureCache.model_key(backbone) != key


def test_identical_files_share_one_entry(backbone, tmp_path):
    paths = _write_images(tmp_path, 2)
    copy = tmp_path / "copy.png"
    copy.write_bytes(paths[0].read_bytes())
    result = extract_embeddings(
        backbone, [paths[0], paths[1], copy], cache=FeatureCache(tmp_path / "c"), progress=False
    )
    np.testing.assert_array_equal(result[0], result[2])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_names_the_path(backbone, tmp_path, num_workers):
    paths = _write_images(tmp_path, 3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError) as info:
        extract_embeddings(
            backbone,
            paths[:2] + [broken] + paths[2:],
            batch_size=2,
            num_workers=num_workers,
            cache=None,
            progress=False,
        )
    assert str(broken) in str(info.value)
    assert "Traceback" not in str(info.value)


def test_missing_image_with_cache_names_the_path(backbone, tmp_path):
    with pytest.raises(DataError, match="absent.png"):
        extract_embeddings(backbone, [tmp_path / "absent.png"], cache=FeatureCache(tmp_path / "c"), progress=False)


def test_one_worker_gives_the_same_result(backbone, tmp_path):
    paths = _write_images(tmp_path, 5)
    serial = extract_embeddings(backbone, paths, batch_size=2, num_workers=0, cache=None, progress=False)
    parallel = extract_embeddings(backbone, paths, batch_size=2, num_workers=1, cache=None, progress=False)
    np.testing.assert_array_equal(serial, parallel)


def test_feature_maps_cover_every_image_once(backbone, tmp_path):
    paths = _write_images(tmp_path, 5)
    seen = []
    for positions, maps in extract_feature_maps(backbone, paths, ["layer2", "layer3"], batch_size=2, progress=False):
        seen.extend(positions)
        for layer in ("layer2", "layer3"):
            info = backbone.feature_info[layer]
            assert maps[layer].shape == (len(positions), info["channels"], 64 // info["stride"], 64 // info["stride"])
        assert maps["embedding"].shape == (len(positions), backbone.embedding_dim)
    assert seen == list(range(5))
    assert torch.is_grad_enabled()  # inference mode does not leak to the caller


def test_bad_arguments_are_clear(backbone, tmp_path):
    paths = _write_images(tmp_path, 1)
    with pytest.raises(ParameterError, match="batch_size"):
        extract_embeddings(backbone, paths, batch_size=0, progress=False)
    with pytest.raises(ParameterError, match="num_workers"):
        extract_embeddings(backbone, paths, num_workers=-1, progress=False)
    with pytest.raises(ParameterError, match="cache"):
        extract_embeddings(backbone, paths, cache="nowhere", progress=False)
    with pytest.raises(ParameterError, match="layer2"):
        next(extract_feature_maps(backbone, paths, ["layer7"], progress=False))
    assert extract_embeddings(backbone, [], progress=False).shape == (0, 512)


def test_many_small_writes_are_merged_and_kept(backbone, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    rows = np.arange(40 * 512, dtype=np.float32).reshape(40, 512)
    hashes = [f"{i:064x}" for i in range(40)]
    for i in range(40):
        cache.put_many(backbone, hashes[i : i + 1], rows[i : i + 1])
    folder = tmp_path / "cache" / FeatureCache.model_key(backbone)
    assert len(list(folder.glob("*.npz"))) <= 17
    found = FeatureCache(tmp_path / "cache").get_many(backbone, hashes)
    np.testing.assert_array_equal(np.stack([found[h] for h in hashes]), rows)
    assert not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("cached", [False, True])
def test_unreadable_images_are_recorded_and_skipped_with_errors(backbone, tmp_path, cached):
    (tmp_path / "img").mkdir()
    paths = _write_images(tmp_path / "img", 5)
    broken = tmp_path / "img" / "broken.png"
    broken.write_bytes(b"not an image")
    copy = tmp_path / "img" / "broken_copy.png"
    copy.write_bytes(b"not an image")  # same bytes: run once through the cache, both reported
    mixed = [paths[0], broken, paths[1], copy, paths[2]]
    cache = FeatureCache(tmp_path / "cache") if cached else None
    with pytest.raises(DataError, match="broken.png cannot be decoded"):
        extract_embeddings(backbone, mixed, batch_size=2, cache=cache, progress=False)
    errors: dict[int, str] = {}
    out = extract_embeddings(backbone, mixed, batch_size=2, cache=cache, progress=False, errors=errors)
    assert sorted(errors) == [1, 3] and "cannot be decoded" in errors[1]
    assert np.isnan(out[[1, 3]]).all() and np.isfinite(out[[0, 2, 4]]).all()
    np.testing.assert_allclose(out[[0, 2, 4]], _one_by_one(backbone, [paths[0], paths[1], paths[2]]), atol=1e-4)
    if cached:  # nothing was stored for the unreadable file: a second call reports it again
        again: dict[int, str] = {}
        extract_embeddings(backbone, mixed, batch_size=2, cache=cache, progress=False, errors=again)
        assert sorted(again) == [1, 3]


def test_feature_maps_skip_unreadable_images_with_errors(backbone, tmp_path):
    (tmp_path / "img").mkdir()
    paths = _write_images(tmp_path / "img", 3)
    (tmp_path / "img" / "zero.png").write_bytes(b"")
    mixed = [paths[0], tmp_path / "img" / "zero.png", paths[1], paths[2]]
    errors: dict[int, str] = {}
    layer = backbone.patch_layers[0]
    seen = [
        pos
        for positions, _ in extract_feature_maps(backbone, mixed, [layer], batch_size=2, progress=False, errors=errors)
        for pos in positions
    ]
    assert seen == [0, 2, 3] and list(errors) == [1] and "empty (0 bytes)" in errors[1]


def test_a_full_disk_under_the_cache_is_a_warning_and_the_run_goes_on(backbone, tmp_path, monkeypatch):
    """A cache is an optimisation: its failed writes warn, the features come back all the same."""
    import errno

    from anomalib_study import io

    paths = _write_images(tmp_path, 3)
    expected = extract_embeddings(backbone, paths, cache=None, progress=False)

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)  # every atomic write fails as on a full disk
    cache = FeatureCache(tmp_path / "cache")
    with pytest.warns(UserWarning, match=r"feature cache: could not write to .*no space left.*the run goes on"):
        rows = extract_embeddings(backbone, paths, cache=cache, progress=False)
    np.testing.assert_array_equal(rows, expected)
    assert not list((tmp_path / "cache").rglob("*.npz")) and not list((tmp_path / "cache").rglob("*.tmp"))
