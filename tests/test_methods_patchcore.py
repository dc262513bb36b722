"""PatchCore: Eq. 7 by hand, anomaly-map smoothing, scores on tiny features, save/load, end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from anomalib_study.errors import ModelFileError, ParameterError
from anomalib_study.methods import METHODS, NotFittedError
from anomalib_study.methods.patchcore import PatchCore, anomaly_maps, gaussian_kernel_size, reweighted_image_scores


def test_reweighting_matches_eq7_by_hand():
    d = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    expected0 = (1 - math.exp(1) / (math.exp(1) + math.exp(2) + math.exp(3))) * 1.0
    expected1 = (1 - 1 / 3) * 2.0
    assert reweighted_image_scores(d) == pytest.approx([expected0, expected1])
    assert reweighted_image_scores(np.array([[4.0]])) == pytest.approx([4.0])  # b = 1: the max score


def test_reweighting_is_stable_for_huge_distances():
    d = np.array([[1000.0, 1001.0, 1500.0], [5000.0, 1.0, 1.0]])
    out = reweighted_image_scores(d)
    assert np.isfinite(out).all()
    # softmax(row)[0]: 1 / (1 + e + e^500) ~ 0 -> weight ~1; second: ~1 -> weight ~ 2 e^-4999 ~ 0
    assert out[0] == pytest.approx(1000.0)
    assert 0.0 <= out[1] < 1e-300


def test_anomaly_map_smoothing_is_a_gaussian_of_sigma():
    grid = np.zeros((1, 41, 41), dtype=np.float32)
    grid[0, 20, 20] = 1.0
    smoothed = anomaly_maps(grid, size=(41, 41), sigma=4.0)[0]  # same size: no upsampling
    reference = ndimage.gaussian_filter(grid[0], sigma=4.0, mode="reflect", truncate=4.0)
    assert np.allclose(smoothed, reference, atol=1e-5)
    ys, xs = np.mgrid[:41, :41]
    variance = float((smoothed * (xs - 20) ** 2).sum() / smoothed.sum())
    assert variance == pytest.approx(16.0, rel=0.02)
    assert gaussian_kernel_size(4.0) == 33
    unsmoothed = anomaly_maps(np.full((2, 4, 4), 3.0), size=(16, 16), sigma=0)
    assert unsmoothed.shape == (2, 16, 16) and np.allclose(unsmoothed, 3.0)


def _tiny_features(rng, n_images, value=0.0):
    # 2 x 2 grid of 3-D patches near ``value``
    return (value + 0.01 * rng.normal(size=(n_images, 4, 3))).astype(np.float32)


def test_scores_on_tiny_features_by_hand():
    rng = np.random.default_rng(0)
    train = _tiny_features(rng, 5)
    model = PatchCore(coreset_ratio=1.0, calibration_fraction=0.0, num_neighbours=1, sigma=0, progress=False).fit(train)
    assert model.memory_bank_.shape == (20, 3) and model.grid_shape_ == (2, 2)
    test = _tiny_features(rng, 2)
    test[1, 3] = [3.0, 4.0, 0.0]  # one far patch: distance ~5 to every bank patch
    patch, image_max, image_rw = model.score_patches(test)
    bank = model.memory_bank_
    exact = np.sqrt(((test.reshape(-1, 1, 3) - bank[None]) ** 2).sum(-1)).min(1).reshape(2, 4)
    assert np.allclose(patch, exact, atol=1e-4)
    assert image_max[1] == pytest.approx(5.0, abs=0.05) and image_max[0] < 0.1
    assert np.allclose(image_rw, image_max)  # b = 1
    assert model.score(test)[1] > model.score(test)[0]
    maps = model.anomaly_maps(patch, size=(8, 8))
    assert maps.shape == (2, 8, 8) and maps[1, 6:, 6:].mean() > maps[1, :2, :2].mean()


def test_reweighted_score_uses_the_neighbourhood_of_m_star():
    bank_points = np.array([[0, 0], [1, 0], [10, 0], [0, 20]], dtype=np.float32)
    train = bank_points.reshape(1, 4, 2)
    model = PatchCore(coreset_ratio=1.0, calibration_fraction=0.0, num_neighbours=3, progress=False).fit(train)
    test = np.array([[[0, 0], [1, 0], [10, 0], [-2, 0]]], dtype=np.float32)  # max patch (-2, 0): m* = (0, 0)
    _, image_max, image_rw = model.score_patches(test)
    assert image_max[0] == pytest.approx(2.0)
    # N_3(m*) = (0,0), (1,0), (10,0); the test patch (-2,0) is 2, 3 and 12 away from them
    expected = (1 - math.exp(2) / (math.exp(2) + math.exp(3) + math.exp(12))) * 2.0
    assert image_rw[0] == pytest.approx(expected)


def test_coreset_ratio_sets_the_bank_size_and_calibration_threshold():
    rng = np.random.default_rng(1)
    train = _tiny_features(rng, 10)
    model = PatchCore(coreset_ratio=0.25, calibration_fraction=0.2, thres_ratio=0.5, progress=False).fit(train)
    assert model.memory_bank_.shape == (8, 3)  # 8 bank images x 4 patches x 0.25
    assert model.calibration_scores_max_.shape == (2,) and model.n_train_images_ == 10
    assert model.threshold_ == pytest.approx(np.quantile(model.calibration_scores_reweighted_, 0.5))
    test = _tiny_features(rng, 2)
    test[1] += 50
    predicted = model.predict(test)
    assert predicted[1] == 1
    assert predicted.tolist() == (model.score(test) > model.threshold_).astype(int).tolist()


def test_no_threshold_without_calibration():
    model = PatchCore(calibration_fraction=0.0, progress=False).fit(_tiny_features(np.random.default_rng(2), 4))
    assert math.isnan(model.threshold_)
    with pytest.raises(ParameterError, match="calibration_fraction"):
        model.predict(_tiny_features(np.random.default_rng(3), 1))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"coreset_ratio": 0}, "ratio"),
        ({"image_score": "mean"}, "image_score"),
        ({"patch_size": 4}, "patch_size"),
        ({"sampler": "kmeans"}, "sampler"),
        ({"sigma": -1}, "sigma"),
        ({"calibration_fraction": 1.0}, "calibration"),
        ({"num_neighbours": 0}, "num_neighbours"),
        ({"index": ""}, "index"),
        ({"resize_mode": "stretch"}, "resize_mode"),
        ({"precision": "fp16"}, "precision must be one of fp32, bf16, auto"),
        ({"precision": None}, "precision"),
        ({"coreset_precision": "fp8"}, "coreset_precision must be one of fp32, bf16, fp16"),
        ({"coreset_precision": "fp8", "sampler": "random"}, "coreset_precision must be one of"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ParameterError, match=match):
        PatchCore(progress=False, **params).fit(_tiny_features(np.random.default_rng(0), 3))


def test_bad_input_and_not_fitted():
    model = PatchCore(progress=False)
    with pytest.raises(NotFittedError, match="PatchCore is not fitted"):
        model.score(np.zeros((1, 4, 3)))
    with pytest.raises(ParameterError, match=r"\(n_images, h\*w, D\)"):
        model.fit(np.zeros((4, 3)))
    model.fit(_tiny_features(np.random.default_rng(0), 3))
    with pytest.raises(ParameterError, match="D=5"):
        model.score(np.zeros((1, 4, 5)))
    with pytest.raises(ParameterError, match="patches per image"):
        model.score(np.zeros((1, 9, 3)))
    bad = _tiny_features(np.random.default_rng(0), 3)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ParameterError, match="NaN"):
        PatchCore(progress=False).fit(bad)


def test_save_load_roundtrip_and_refusals(tmp_path):
    rng = np.random.default_rng(4)
    model = PatchCore(coreset_ratio=0.5, calibration_fraction=0.25, progress=False).fit(_tiny_features(rng, 8))
    test = _tiny_features(rng, 3)
    path = model.save(tmp_path / "model.npz")
    loaded = PatchCore.load(path)
    assert np.array_equal(loaded.memory_bank_, model.memory_bank_)
    assert np.allclose(loaded.score(test), model.score(test))
    assert loaded.threshold_ == model.threshold_ and loaded.grid_shape_ == model.grid_shape_
    assert loaded.get_params()["coreset_ratio"] == 0.5
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="junk.npz"):
        PatchCore.load(tmp_path / "junk.npz")
    with pytest.raises(ModelFileError, match="does not exist"):
        PatchCore.load(tmp_path / "missing.npz")


def test_trained_index_option_is_saved(tmp_path):
    rng = np.random.default_rng(5)
    train = rng.normal(size=(100, 4, 3)).astype(np.float32)
    model = PatchCore(coreset_ratio=1.0, calibration_fraction=0.0, index="IVF4,Flat", progress=False).fit(train)
    assert model.index_.describe()["factory"] == "IVF4,Flat"
    test = rng.normal(size=(3, 4, 3)).astype(np.float32)
    loaded = PatchCore.load(model.save(tmp_path / "ivf.npz"))
    assert loaded.index_.describe()["factory"] == "IVF4,Flat"
    assert np.allclose(loaded.score(test), model.score(test))


def test_registered():
    assert METHODS["patchcore"] is PatchCore


# ---------------------------------------------------------------------------------- precision
@pytest.fixture
def bf16_quietly():
    """bf16 asked for on a CPU without it warns (emulated, slow): expected in these tests."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="precision='bf16'")
        yield


def _clustered_patches(rng, n_images, n_patches=16, d=24):
    centres = rng.normal(scale=3.0, size=(6, d)) + 20.0  # far from the origin, as ReLU features are
    rows = centres[rng.integers(0, 6, n_images * n_patches)] + rng.normal(size=(n_images * n_patches, d))
    return rows.reshape(n_images, n_patches, d).astype(np.float32)


def _low_rank_clustered_patches(rng, basis, n_images, n_patches=16):
    """Like _clustered_patches, but each cluster spreads along the columns of ``basis`` (d, r) only,
    with a trace (1e-3) in the other directions: r + a few principal components rank its neighbours."""
    d, r = basis.shape
    centres = rng.normal(scale=3.0, size=(6, d)) + 20.0
    rows = (
        centres[rng.integers(0, 6, n_images * n_patches)]
        + rng.normal(size=(n_images * n_patches, r)) @ basis.T
        + 1e-3 * rng.normal(size=(n_images * n_patches, d))
    )
    return rows.reshape(n_images, n_patches, d).astype(np.float32)


def test_default_precision_is_faiss_fp32_unchanged():
    import faiss

    rng = np.random.default_rng(20)
    train, test = _clustered_patches(rng, 10), _clustered_patches(rng, 3)
    model = PatchCore(coreset_ratio=0.5, calibration_fraction=0.0, progress=False).fit(train)
    assert model.precision == "fp32" and model.precision_used_ == "fp32" and model.index_.precision_used_ == "fp32"
    flat = faiss.IndexFlatL2(24)
    flat.add(model.memory_bank_)
    squared, _ = flat.search(test.reshape(-1, 24), 1)
    patch, _, _ = model.score_patches(test)
    np.testing.assert_array_equal(patch.reshape(-1), np.sqrt(np.clip(squared[:, 0], 0, None)))  # bit for bit
    same = PatchCore(coreset_ratio=0.5, calibration_fraction=0.0, precision="fp32", progress=False).fit(train)
    for a, b in zip(same.score_patches(test), model.score_patches(test)):
        np.testing.assert_array_equal(a, b)


def test_bf16_search_gives_the_exact_scores(bf16_quietly):
    rng = np.random.default_rng(21)
    train, test = _clustered_patches(rng, 10), _clustered_patches(rng, 3)
    fp32 = PatchCore(coreset_ratio=0.5, calibration_fraction=0.2, progress=False).fit(train)
    bf16 = PatchCore(coreset_ratio=0.5, calibration_fraction=0.2, precision="bf16", progress=False).fit(train)
    assert bf16.precision_used_ == "bf16" and bf16.index_.describe()["precision_used"] == "bf16"
    np.testing.assert_array_equal(bf16.memory_bank_, fp32.memory_bank_)  # the coreset is float32 either way
    assert bf16.index_.rerank_hit_rate(test.reshape(-1, 24))["hit_rate"] == 1.0
    for a, b in zip(bf16.score_patches(test), fp32.score_patches(test)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    assert bf16.threshold_ == pytest.approx(fp32.threshold_, rel=1e-5)
    half = PatchCore(coreset_ratio=0.5, calibration_fraction=0.2, coreset_precision="fp16", progress=False).fit(train)
    assert half.memory_bank_.shape == fp32.memory_bank_.shape
    # approximate indexes keep faiss's own search
    ivf = PatchCore(
        coreset_ratio=1.0, calibration_fraction=0.0, index="IVF2,Flat", precision="bf16", progress=False
    ).fit(train)
    assert ivf.precision_used_ == "bf16" and ivf.index_.precision_used_ == "fp32"


def test_auto_precision_resolves_on_the_hardware(monkeypatch, bf16_quietly):
    import anomalib_study.hardware as hardware

    train = _clustered_patches(np.random.default_rng(22), 4)
    here = PatchCore(precision="auto", calibration_fraction=0.0, progress=False).fit(train)
    assert here.precision_used_ == ("bf16" if hardware.native_bf16("cpu") else "fp32")
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": True)
    native = PatchCore(precision="auto", calibration_fraction=0.0, progress=False).fit(train)
    assert native.precision_used_ == "bf16" and native.index_.precision_used_ == "bf16"
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": False)
    assert PatchCore(precision="auto", calibration_fraction=0.0, progress=False).fit(train).precision_used_ == "fp32"


def test_precision_is_saved_and_old_files_load_as_fp32(tmp_path, bf16_quietly):
    from anomalib_study.methods.base import load_model_file, save_model_file
    from anomalib_study.methods.patchcore import FORMAT_NAME, FORMAT_VERSION

    rng = np.random.default_rng(23)
    train, test = _clustered_patches(rng, 6), _clustered_patches(rng, 2)
    model = PatchCore(coreset_ratio=0.5, calibration_fraction=0.0, precision="bf16", progress=False).fit(train)
    loaded = PatchCore.load(model.save(tmp_path / "bf16.npz"))
    assert loaded.precision == "bf16" and loaded.precision_used_ == "bf16" and loaded.index_.precision_used_ == "bf16"
    np.testing.assert_array_equal(loaded.score(test), model.score(test))
    header, arrays = load_model_file(tmp_path / "bf16.npz", FORMAT_NAME, FORMAT_VERSION)
    del header["precision_used_"], header["params"]["precision"]  # a file written before the precision option
    header = {k: v for k, v in header.items() if k not in ("format", "version")}
    save_model_file(tmp_path / "old.npz", FORMAT_NAME, FORMAT_VERSION, header, arrays)
    old = PatchCore.load(tmp_path / "old.npz")
    assert old.precision == "fp32" and old.precision_used_ == "fp32" and old.index_.precision_used_ == "fp32"
    header["precision_used_"] = "fp8"
    save_model_file(tmp_path / "bad.npz", FORMAT_NAME, FORMAT_VERSION, header, arrays)
    with pytest.raises(ModelFileError, match="precision_used_"):
        PatchCore.load(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def synthetic_class(tmp_path_factory):
    from anomalib_study.data import load_dataset
    from anomalib_study.data.synthetic import make_synthetic_dagm

    root = make_synthetic_dagm(tmp_path_factory.mktemp("synthetic"), seed=0)
    return load_dataset("dagm", root, category="Class1")


@pytest.fixture(scope="module")
def fitted(synthetic_class):
    from anomalib_study.backbones import load_backbone

    backbone = load_backbone("efficientnet_lite0", image_size=128)
    model = PatchCore(backbone=backbone, coreset_ratio=0.1, progress=False)
    return model.fit_paths([r.path for r in synthetic_class.train])


@pytest.mark.slow
def test_end_to_end_on_the_synthetic_set(fitted, synthetic_class, tmp_path):
    from anomalib_study.backbones import load_backbone
    from anomalib_study.metrics import image_auroc

    assert fitted.grid_shape_ == (16, 16) and fitted.n_features_in_ == 152  # stage2 40 + stage3 112 channels
    assert fitted.memory_bank_.shape[0] == int(0.1 * 22 * 256)  # 2 of 24 images held out for the threshold
    out = fitted.score_paths([r.path for r in synthetic_class.test], keep_patch_scores=True)
    labels = np.array([r.label for r in synthetic_class.test])
    assert out["anomaly_maps"].shape == (len(labels), 128, 128) and out["patch_scores"].shape == (len(labels), 16, 16)
    # the global kNN reaches ~0.7 here; local patches do far better
    assert image_auroc(labels, out["image_scores_max"]) > 0.85
    assert image_auroc(labels, out["image_scores_reweighted"]) > 0.85
    assert np.array_equal(out["image_scores"], out["image_scores_reweighted"])

    path = fitted.save(tmp_path / "patchcore.npz")
    again = PatchCore.load(path, backbone=fitted.get_backbone())
    subset = [r.path for r in synthetic_class.test[-3:]]
    assert np.allclose(again.score_paths(subset)["image_scores"], out["image_scores"][-3:], rtol=1e-4)
    by_name = PatchCore.load(path)  # the backbone is loaded from the stored name, size and weights
    assert by_name.get_backbone().image_size == 128
    other = load_backbone("efficientnet_lite0", image_size=96)
    with pytest.raises(ModelFileError, match="image_size"):
        PatchCore.load(path, backbone=other)
    squashed = load_backbone("efficientnet_lite0", image_size=128, resize_mode="squash")
    with pytest.raises(ModelFileError, match="preprocessing"):  # same network and size, other geometry
        PatchCore.load(path, backbone=squashed)


def test_bf16_forward_on_images(synthetic_class, bf16_quietly):
    """precision='bf16' runs the backbone under bf16 autocast: float32 patch features, close scores."""
    from anomalib_study.backbones import load_backbone
    from anomalib_study.methods.patchcore import SPEC

    backbone = load_backbone("efficientnet_lite0", image_size=64)
    train, test = [r.path for r in synthetic_class.train[:3]], [r.path for r in synthetic_class.test[:4]]
    fp32 = PatchCore(backbone=backbone, coreset_ratio=0.2, calibration_fraction=0.0, progress=False).fit_paths(train)
    bf16 = PatchCore(
        backbone=backbone, coreset_ratio=0.2, calibration_fraction=0.0, precision="bf16", progress=False
    ).fit_paths(train)
    assert bf16.precision_used_ == "bf16" and bf16.memory_bank_.dtype == np.float32
    assert not np.array_equal(bf16.memory_bank_, fp32.memory_bank_)  # the forward did run in bf16
    a, b = fp32.score_paths(test)["image_scores"], bf16.score_paths(test)["image_scores"]
    assert np.corrcoef(a, b)[0, 1] > 0.9 and np.allclose(a, b, rtol=0.1)
    described = SPEC.describe(bf16)
    assert described["precision"] == "bf16" and described["precision_used"] == "bf16"
    assert described["index_describe"]["precision_used"] == "bf16"
    assert SPEC.describe(fp32)["precision_used"] == "fp32"
    assert any(p.name == "precision" and p.default == "fp32" and "auto" in p.choices for p in SPEC.params)


def test_squash_mode_is_saved_and_restored(synthetic_class, tmp_path):
    from anomalib_study.backbones import load_backbone

    backbone = load_backbone("efficientnet_lite0", image_size=64, resize_mode="squash")
    model = PatchCore(backbone=backbone, coreset_ratio=0.05, progress=False).fit_paths(
        [r.path for r in synthetic_class.train[:6]]
    )
    path = model.save(tmp_path / "squash.npz")
    by_name = PatchCore.load(path)
    assert by_name.resize_mode == "squash"
    assert by_name.get_backbone().preprocessing["resize_mode"] == "squash"


def test_search_dim_gives_the_exact_scores_and_is_saved(tmp_path, bf16_quietly):
    """search_dim: candidates from the bank's principal components, 8 re-ranked exactly: on patches whose
    variance lies in few directions, the same scores as faiss's exact search; saved with the model."""
    rng = np.random.default_rng(24)
    basis = np.linalg.qr(rng.normal(size=(24, 24)))[0][:, :6]  # clusters spread in 6 of 24 directions
    train, test = _low_rank_clustered_patches(rng, basis, 10), _low_rank_clustered_patches(rng, basis, 3)
    exact = PatchCore(coreset_ratio=0.5, calibration_fraction=0.2, progress=False).fit(train)
    for precision in ("fp32", "bf16"):
        model = PatchCore(
            coreset_ratio=0.5, calibration_fraction=0.2, precision=precision, search_dim=12, progress=False
        ).fit(train)
        described = model.index_.describe()
        assert described["candidate_dim_used"] == 12 and described["rerank"] == 8
        assert model.index_.rerank_hit_rate(test.reshape(-1, 24))["hit_rate"] == 1.0
        for a, b in zip(model.score_patches(test), exact.score_patches(test)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    loaded = PatchCore.load(model.save(tmp_path / "projected.npz"))
    assert loaded.search_dim == 12 and loaded.index_.candidate_dim_used_ == 12
    np.testing.assert_array_equal(loaded.score(test), model.score(test))
    # approximate indexes search as faiss does: search_dim (like the default 256) does not apply to them
    assert PatchCore(index="IVF2,Flat", search_dim=8, progress=False).fit(train).index_.candidate_dim_used_ is None
    with pytest.raises(ParameterError, match="search_dim must be >= 1"):
        PatchCore(search_dim=0, progress=False).fit(train)
