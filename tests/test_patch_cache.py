"""The patch-feature cache: a second extraction of the same images the same way reads what the
first stored, batch for batch and bit for bit; anything that changes the features is a miss; a
failed write, an interrupted extraction and the size limit never leave half an entry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomalib_study.backbones import load_backbone
from anomalib_study.patch_cache import PatchCache
from anomalib_study.patches import PatchFeatures, iter_patch_features


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = folder / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (folder / "broken.png").write_bytes(b"not an image")
    return paths, folder / "broken.png"


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("efficientnet_lite0", image_size=64)


def _run(backbone, paths, cache, maker=None, batch_size=2, errors=None):
    record: dict = {}
    batches = list(
        iter_patch_features(
            backbone,
            paths,
            maker or PatchFeatures(),
            batch_size=batch_size,
            progress=False,
            cache=cache,
            record=record,
            errors=errors,
        )
    )
    return batches, record


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.positions == y.positions and x.grid == y.grid and x.input_size == y.input_size
        np.testing.assert_array_equal(x.features, y.features)


def test_a_second_extraction_reads_the_stored_batches_bit_for_bit(tmp_path, images, backbone):
    paths, _ = images
    cache = PatchCache(tmp_path / "patches", limit=2**30)
    first, record = _run(backbone, paths, cache)
    assert record["patch_cache"] == "extracted" and len(first) == 3
    second, again = _run(backbone, paths, cache)
    assert again == {"patch_cache": "hit", "key": record["key"]}
    _same(first, second)
    uncached, off = _run(backbone, paths, None)
    assert off["patch_cache"] == "off"
    _same(first, uncached)


def test_what_changes_the_features_is_a_miss(tmp_path, images, backbone):
    paths, _ = images
    cache = PatchCache(tmp_path / "patches", limit=2**30)
    _, base = _run(backbone, paths, cache)
    _, batch = _run(backbone, paths, cache, batch_size=3)
    _, maker = _run(backbone, paths, cache, maker=PatchFeatures(patch_size=1))
    _, order = _run(backbone, paths[::-1], cache)
    _, size = _run(load_backbone("efficientnet_lite0", image_size=96), paths, cache)
    keys = {r["key"] for r in (base, batch, maker, order, size)}
    assert len(keys) == 5 and all(r["patch_cache"] == "extracted" for r in (batch, maker, order, size))


def test_an_edit_to_the_extraction_code_is_a_miss(tmp_path, images, backbone, monkeypatch):
    from anomalib_study import features, freshness, patches

    assert patches.PATCH_CODE == freshness.code_version(
        features.EXTRACTION_MODULES + patches.PATCH_MODULES, libraries=True
    )
    paths, _ = images
    cache = PatchCache(tmp_path / "patches", limit=2**30)
    _, base = _run(backbone, paths, cache)
    with monkeypatch.context() as patch:
        patch.setattr(patches, "PATCH_CODE", "another version")  # an edited module, an upgrade
        _, after = _run(backbone, paths, cache)
    assert after["patch_cache"] == "extracted" and after["key"] != base["key"]
    _, again = _run(backbone, paths, cache)
    assert again == {"patch_cache": "hit", "key": base["key"]}


def test_unreadable_images_are_recorded_on_a_hit_too(tmp_path, images, backbone):
    paths, broken = images
    cache = PatchCache(tmp_path / "patches", limit=2**30)
    first_errors: dict = {}
    first, _ = _run(backbone, [*paths, broken], cache, errors=first_errors)
    errors: dict = {}
    second, record = _run(backbone, [*paths, broken], cache, errors=errors)
    assert record["patch_cache"] == "hit" and errors == first_errors and list(errors) == [5]
    _same(first, second)


def test_an_interrupted_extraction_or_a_failed_write_stores_nothing(tmp_path, images, backbone):
    paths, _ = images
    cache = PatchCache(tmp_path / "patches", limit=2**30)
    generator = iter_patch_features(backbone, paths, PatchFeatures(), batch_size=2, progress=False, cache=cache)
    next(generator)
    generator.close()  # the consumer stopped after one batch
    assert not any(tmp_path.joinpath("patches").iterdir())
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not write"):
        batches, record = _run(backbone, paths, PatchCache(blocked / "patches", limit=2**30))
    assert len(batches) == 3 and record["patch_cache"] == "extracted"  # the run went on


def test_the_least_recently_used_entries_go_beyond_the_limit(tmp_path, images, backbone, monkeypatch):
    paths, _ = images
    cache = PatchCache(tmp_path / "patches", limit=2**30)
    _, old = _run(backbone, paths[:2], cache)
    _, new = _run(backbone, paths[2:], cache)
    cache.limit = 1  # smaller than any entry: everything but the one kept goes
    assert cache.evict(keep=new["key"]) == [old["key"]]
    assert _run(backbone, paths[2:], cache)[1]["patch_cache"] == "hit"
    monkeypatch.setenv("ANOMALIB_STUDY_PATCH_CACHE_GB", "0")
    assert _run(backbone, paths, True)[1]["patch_cache"] == "off"
