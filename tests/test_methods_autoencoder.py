"""AutoEncoder: networks' shapes, scores by hand, bright squares on flat gray, seeding,
checkpoint resume, save/load, refusals, bad parameters, precision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from anomalib_study.errors import DataError, ModelFileError, ParameterError, WeightsError
from anomalib_study.methods.autoencoder import (
    CHECKPOINT_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    AutoEncoder,
    ConvAutoEncoder,
    decode_images,
    native_bf16,
    reconstruction_loss,
    reconstruction_scores,
    residual_maps,
    split_validation,
)
from anomalib_study.methods.base import NotFittedError, load_model_file, save_model_file

SIDE = 32
SQUARE = (slice(8, 16), slice(8, 16))  # where the bright square lies at SIDE px
FAST = dict(image_size=SIDE, batch_size=8, val_fraction=0.25, progress=False)  # one step per epoch here
# the resume tests need several shuffled batches per epoch (8 training images -> 2 batches)
# and every epoch to run (no early stop)
RESUME = dict(FAST, batch_size=4, patience=10)


def _gray(rng, n, side=SIDE, square=False) -> np.ndarray:
    """(n, 3, side, side) uint8 flat gray images (level 100..140, noise sd 2); with ``square``
    a white square covering SQUARE (scaled to ``side``)."""
    levels = rng.uniform(100, 140, size=(n, 1, 1, 1))
    images = np.clip(levels + rng.normal(0, 2, size=(n, 3, side, side)), 0, 255)
    if square:
        k = side // SIDE
        images[:, :, SQUARE[0].start * k : SQUARE[0].stop * k, SQUARE[1].start * k : SQUARE[1].stop * k] = 255
    return images.round().astype(np.uint8)


def _write(folder, name, images) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{name}_{i:02d}.png"
        Image.fromarray(image.transpose(1, 2, 0)).save(path)
        paths.append(path)
    return paths


def _state_equal(a: AutoEncoder, b: AutoEncoder) -> bool:
    sa, sb = a.network_.state_dict(), b.network_.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The 32 px networks here are so small that a second intra-op thread costs more in
    synchronisation than it saves (10x slower when the 2 cores are busy elsewhere)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def normal_images():
    return _gray(np.random.default_rng(0), 10)


@pytest.fixture(scope="module")
def reference(normal_images):
    """An uninterrupted 4-epoch fit."""
    return AutoEncoder(epochs=4, **RESUME).fit(normal_images)


# ---------------------------------------------------------------------------------- pure parts
def test_scores_by_hand():
    images = torch.full((2, 3, SIDE, SIDE), 0.5)
    recon = images.clone()
    recon[0] += 0.1  # a constant residual of 0.1 everywhere
    recon[1, :, 5, 7] += 0.9  # one wrong pixel in every channel
    scores = reconstruction_scores(images, recon)
    assert scores["mse"][0].item() == pytest.approx(0.01, rel=1e-4)
    assert scores["residual"][0].item() == pytest.approx(0.01, rel=1e-4)  # a flat map: its top 1 % is 0.01 too
    assert scores["mse"][1].item() == pytest.approx(0.81 / SIDE**2, rel=1e-4)
    spike = np.zeros((SIDE, SIDE))
    spike[5, 7] = 0.81
    # torch's "reflect" padding (d c b | a b c d) is scipy's "mirror"; the pixel sits near a border
    smoothed = ndimage.gaussian_filter(spike, sigma=4.0, mode="mirror", truncate=4.0)
    assert np.allclose(scores["maps"][1].numpy(), smoothed, atol=1e-6)
    top = np.sort(smoothed.ravel())[::-1][: math.ceil(0.01 * SIDE**2)]  # 11 of 1024 pixels
    assert scores["residual"][1].item() == pytest.approx(top.mean(), rel=1e-4)
    assert residual_maps(images, recon, sigma=0)[1, 5, 7].item() == pytest.approx(0.81)


def test_losses():
    rng = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, SIDE, SIDE, generator=rng), torch.rand(2, 3, SIDE, SIDE, generator=rng)
    mse = torch.mean((a - b) ** 2)
    assert reconstruction_loss(a, b, "mse").item() == pytest.approx(mse.item())
    assert reconstruction_loss(a, b, "mse_ssim", ssim_weight=0.0).item() == pytest.approx(mse.item())
    assert reconstruction_loss(a, a, "mse_ssim", ssim_weight=0.5).item() == pytest.approx(0.0, abs=1e-6)
    from pytorch_msssim import ssim

    expected = 0.7 * mse + 0.3 * (1 - ssim(a, b, data_range=1.0))
    assert reconstruction_loss(a, b, "mse_ssim", ssim_weight=0.3).item() == pytest.approx(expected.item(), rel=1e-5)


def test_validation_split():
    train, held = split_validation(10, 0.25, seed=0)
    assert held.size == 2 and train.size == 8 and np.array_equal(np.sort(np.r_[train, held]), np.arange(10))
    assert np.array_equal(split_validation(10, 0.25, seed=0)[1], held)
    assert split_validation(2, 0.01, seed=0)[1].size == 1  # at least one held out
    assert split_validation(2, 0.99, seed=0)[0].size == 1  # at least one left to train
    with pytest.raises(ParameterError, match="at least 2"):
        split_validation(1, 0.5, seed=0)


def test_decode_squashes_the_whole_image(tmp_path):
    wide = np.zeros((16, 64, 3), np.uint8)  # H 16 x W 64: left half black, right half white
    wide[:, 32:] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(np.full((40, 40), 77, np.uint8), mode="L").save(tmp_path / "gray.png")  # grayscale -> RGB
    decoded = decode_images([tmp_path / "wide.png", tmp_path / "gray.png"], SIDE, batch_size=1)
    assert decoded.shape == (2, 3, SIDE, SIDE) and decoded.dtype == torch.uint8
    assert (decoded[0, :, :, :15] == 0).all() and (decoded[0, :, :, 17:] == 255).all()  # nothing cropped away
    assert (decoded[1] == 77).all()


# ---------------------------------------------------------------------------------- networks
def test_conv_network_shapes():
    network = ConvAutoEncoder().eval()
    with torch.no_grad():
        x = torch.rand(2, 3, SIDE, SIDE)
        assert network.encoder(x).shape == (2, 512, 1, 1)
        y = network(x)
        assert network.encoder(torch.rand(1, 3, 128, 128)).shape == (1, 512, 4, 4)  # 128 px -> 4 px
    assert y.shape == x.shape and 0 < y.min() and y.max() < 1


@pytest.mark.slow
def test_conv_model_outputs(reference, normal_images):
    out = reference.score_images(normal_images[:3])
    assert out["anomaly_maps"].shape == (3, SIDE, SIDE) and out["anomaly_maps"].dtype == np.float32
    for key in ("image_scores", "image_scores_mse", "image_scores_residual"):
        assert out[key].shape == (3,) and out[key].dtype == np.float64
    assert np.array_equal(out["image_scores"], out["image_scores_residual"])  # the default kind
    recon = reference.reconstruct(normal_images[:3])
    assert recon.shape == (3, 3, SIDE, SIDE) and recon.dtype == np.float32 and 0 <= recon.min() <= recon.max() <= 1
    # uint8 0..255 and float 0..1 inputs are the same images
    as_float = reference.score_images(normal_images[:3].astype(np.float32) / 255)
    assert np.allclose(as_float["image_scores_mse"], out["image_scores_mse"], rtol=1e-5)
    assert [row["epoch"] for row in reference.history_] == [1, 2, 3, 4] and reference.epochs_run_ == 4
    assert set(reference.history_[0]) == {"epoch", "train_loss", "val_loss", "lr", "seconds"}
    assert reference.best_epoch_ == 1 + int(np.argmin([row["val_loss"] for row in reference.history_]))
    assert reference.n_train_images_ == 8 and reference.n_val_images_ == 2
    assert reference.calibration_scores_["residual"].shape == (2,)
    assert reference.threshold_ == pytest.approx(np.quantile(reference.calibration_scores_["residual"], 0.99))
    assert reference.precision_used_ == "fp32" and reference.resumed_from_epoch_ == 0
    assert set(reference.timings_) == {"decode_s", "train_s", "seconds_per_epoch", "images_per_s"}


def test_pretrained_model_shapes_and_frozen_stages():
    from anomalib_study.backbones import load_backbone

    images = _gray(np.random.default_rng(1), 6, side=64)
    model = AutoEncoder(
        model="pretrained",
        backbone="efficientnet_lite0",
        image_size=64,
        epochs=1,
        batch_size=4,
        val_fraction=0.34,
        progress=False,
    ).fit(images)
    out = model.score_images(images[:2])
    assert out["anomaly_maps"].shape == (2, 64, 64) and model.reconstruct(images[:2]).shape == (2, 3, 64, 64)
    assert model.backbone_identity_["name"] == "efficientnet_lite0"
    network = model.network_
    assert len(network.tuned) == 2 and not any(p.requires_grad for p in network.frozen.parameters())
    # the frozen part is the registry's network up to stage2, unchanged by training, normalising inside
    backbone = load_backbone("efficientnet_lite0", image_size=64)
    x = torch.rand(2, 3, 64, 64)
    normalised = (x - torch.tensor(backbone.preprocessing["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        backbone.preprocessing["std"]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = backbone(normalised, layers=["stage2"], embedding=False)["stage2"]
        assert torch.allclose(network.frozen((x - network.mean) / network.std), expected, atol=1e-5)
        assert network.encode(x).shape == (2, 320, 2, 2)  # stage4: stride 32


def test_resnet18_needs_a_weights_file(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("ANOMALIB_STUDY_WEIGHTS", str(tmp_path / "no_weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    images = _gray(np.random.default_rng(2), 5)
    with pytest.raises(WeightsError, match="resnet18"):
        AutoEncoder(model="pretrained", backbone="resnet18", **FAST).fit(images)
    weights = tmp_path / "resnet18-random.pth"  # the right architecture, random values
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    model = AutoEncoder(model="pretrained", backbone="resnet18", weights=weights, epochs=1, **FAST).fit(images)
    assert model.network_.encode(torch.rand(1, 3, SIDE, SIDE)).shape == (1, 512, 1, 1)
    assert model.score_images(images)["anomaly_maps"].shape == (5, SIDE, SIDE)


def test_vit_backbones_are_refused():
    with pytest.raises(ParameterError, match="only CNN"):
        AutoEncoder(model="pretrained", backbone="vit_base_patch16_224", **FAST).fit(_gray(np.random.default_rng(0), 4))


# ---------------------------------------------------------------------------------- detection
def test_bright_squares_score_higher_from_files(tmp_path):
    rng = np.random.default_rng(3)
    train = _write(tmp_path / "train", "good", _gray(rng, 10, side=64))  # 64 px files squashed to 32
    normal = _write(tmp_path / "test", "good", _gray(rng, 4, side=64))
    anomalous = _write(tmp_path / "test", "square", _gray(rng, 4, side=64, square=True))
    model = AutoEncoder(epochs=3, **FAST).fit_paths(train)
    assert model.timings_["decode_s"] > 0
    out = model.score_paths(normal + anomalous)
    for key in ("image_scores_mse", "image_scores_residual"):
        assert out[key][4:].min() > out[key][:4].max(), key
    for heat in out["anomaly_maps"][4:]:
        row, col = np.unravel_index(int(heat.argmax()), heat.shape)
        assert SQUARE[0].start <= row < SQUARE[0].stop and SQUARE[1].start <= col < SQUARE[1].stop
    assert model.predict_paths(anomalous).tolist() == [1, 1, 1, 1]
    # batch by batch from the files == all at once from the decoded tensor
    in_memory = model.score_images(decode_images(normal + anomalous, SIDE))
    for key in ("image_scores", "anomaly_maps"):
        assert np.array_equal(in_memory[key], out[key])


def test_mse_loss_and_mse_score():
    rng = np.random.default_rng(4)
    model = AutoEncoder(loss="mse", image_score="mse", epochs=2, **FAST).fit(_gray(rng, 8))
    assert all(math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) for row in model.history_)
    test = np.concatenate([_gray(rng, 2), _gray(rng, 2, square=True)])
    out = model.score_images(test)
    assert np.array_equal(out["image_scores"], out["image_scores_mse"])
    assert out["image_scores"][2:].min() > out["image_scores"][:2].max()
    assert model.threshold_ == pytest.approx(np.quantile(model.calibration_scores_["mse"], 0.99))


@pytest.mark.slow
def test_same_seed_same_scores(normal_images):
    # (the resume tests also compare fits run separately with the 4-epoch reference, bit for bit)
    first, second = (AutoEncoder(epochs=2, **FAST).fit(normal_images) for _ in range(2))
    assert _state_equal(first, second)
    test = _gray(np.random.default_rng(5), 3, square=True)
    assert np.array_equal(first.score_images(test)["image_scores"], second.score_images(test)["image_scores"])
    other = AutoEncoder(epochs=2, seed=1, **FAST).fit(normal_images)
    assert not np.array_equal(other.score_images(test)["image_scores"], first.score_images(test)["image_scores"])


# ---------------------------------------------------------------------------------- checkpoints
@pytest.mark.slow
def test_resume_after_a_crash_is_bit_identical(normal_images, reference, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    original = AutoEncoder._validation_loss
    calls = {"n": 0}

    def crash_in_epoch_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # epochs 1 and 2 are checkpointed, epoch 3 dies after its training steps
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoEncoder, "_validation_loss", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        AutoEncoder(epochs=4, checkpoint_dir=folder, **RESUME).fit(normal_images)
    monkeypatch.setattr(AutoEncoder, "_validation_loss", original)
    stored = torch.load(folder / CHECKPOINT_NAME, weights_only=True)
    assert stored["epoch"] == 2 and len(stored["history"]) == 2

    resumed = AutoEncoder(epochs=4, checkpoint_dir=folder, **RESUME).fit(normal_images)
    assert resumed.resumed_from_epoch_ == 2 and resumed.epochs_run_ == 4
    assert resumed.history_[:2] == stored["history"]  # wall-clock seconds too: read, not recomputed
    assert _state_equal(resumed, reference)
    assert resumed.threshold_ == reference.threshold_
    assert [r["val_loss"] for r in resumed.history_] == [r["val_loss"] for r in reference.history_]


@pytest.mark.slow
def test_more_epochs_extend_a_finished_run(normal_images, reference, tmp_path):
    folder = tmp_path / "ckpt"
    short = AutoEncoder(epochs=2, checkpoint_dir=folder, **RESUME).fit(normal_images)
    assert short.epochs_run_ == 2
    longer = AutoEncoder(epochs=4, checkpoint_dir=folder, **RESUME).fit(normal_images)
    assert longer.resumed_from_epoch_ == 2 and longer.history_[:2] == short.history_
    assert _state_equal(longer, reference)
    with pytest.raises(ModelFileError, match="epochs >= 4"):  # cannot go back to fewer epochs
        AutoEncoder(epochs=3, checkpoint_dir=folder, **RESUME).fit(normal_images)


def test_checkpoint_of_other_parameters_or_images_is_refused(normal_images, tmp_path):
    folder = tmp_path / "ckpt"
    AutoEncoder(epochs=1, checkpoint_dir=folder, **FAST).fit(normal_images)
    with pytest.raises(ModelFileError, match=r"differs in: lr\).*delete the folder"):
        AutoEncoder(epochs=1, lr=2e-3, checkpoint_dir=folder, **FAST).fit(normal_images)
    with pytest.raises(ModelFileError, match="images_sha256.*another checkpoint_dir"):
        AutoEncoder(epochs=1, checkpoint_dir=folder, **FAST).fit(normal_images[::-1].copy())
    (folder / CHECKPOINT_NAME).write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match="cannot be read"):
        AutoEncoder(epochs=1, checkpoint_dir=folder, **FAST).fit(normal_images)


# ---------------------------------------------------------------------------------- save / load
def test_save_load_roundtrip(reference, tmp_path):
    path = reference.save(tmp_path / "ae.npz")
    loaded = AutoEncoder.load(path)
    test = _gray(np.random.default_rng(6), 3, square=True)
    expected, found = reference.score_images(test), loaded.score_images(test)
    for key in ("image_scores", "image_scores_mse", "image_scores_residual", "anomaly_maps"):
        assert np.array_equal(expected[key], found[key]), key
    assert _state_equal(loaded, reference)
    assert loaded.threshold_ == reference.threshold_ and loaded.history_ == reference.history_
    assert loaded.get_params() == reference.get_params()
    assert np.array_equal(loaded.calibration_scores_["mse"], reference.calibration_scores_["mse"])


def test_pretrained_save_load_checks_the_backbone_weights(tmp_path):
    images = _gray(np.random.default_rng(7), 5)
    model = AutoEncoder(model="pretrained", epochs=1, **FAST).fit(images)
    path = model.save(tmp_path / "pretrained.npz")
    loaded = AutoEncoder.load(path)
    assert np.array_equal(loaded.score_images(images)["image_scores"], model.score_images(images)["image_scores"])
    header, arrays = load_model_file(path, FORMAT_NAME, FORMAT_VERSION)
    header.pop("format"), header.pop("version")
    header["backbone_identity_"]["weights_sha256"] = "0" * 64  # as if fitted with other weights
    tampered = save_model_file(tmp_path / "other_weights.npz", FORMAT_NAME, FORMAT_VERSION, header, arrays)
    with pytest.raises(ModelFileError, match="other_weights.npz.*sha256"):
        AutoEncoder.load(tampered)


def test_foreign_and_old_files_are_refused(reference, tmp_path):
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with pytest.raises(ModelFileError, match="foreign.npz"):
        AutoEncoder.load(tmp_path / "foreign.npz")
    save_model_file(tmp_path / "knn.npz", "anomalib_study.knn", 1, {}, {"x": np.zeros(1)})
    with pytest.raises(ModelFileError, match="not 'anomalib_study.autoencoder'"):
        AutoEncoder.load(tmp_path / "knn.npz")
    header, arrays = load_model_file(reference.save(tmp_path / "ae.npz"), FORMAT_NAME, FORMAT_VERSION)
    save_model_file(
        tmp_path / "future.npz",
        FORMAT_NAME,
        FORMAT_VERSION + 1,
        {k: v for k, v in header.items() if k not in ("format", "version")},
        arrays,
    )
    with pytest.raises(ModelFileError, match="future.npz is version 2"):
        AutoEncoder.load(tmp_path / "future.npz")


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "params, match",
    [
        ({"model": "x"}, "model"),
        ({"ssim_weight": 2}, "ssim_weight"),
        ({"image_size": 30}, "image_size"),
        ({"loss": "l1"}, "loss"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"image_score": "max"}, "image_score"),
        ({"precision": "fp16"}, "precision"),
        ({"patience": 0}, "patience"),
        ({"lr": 0}, "lr"),
        ({"thres_ratio": 1.5}, "thres_ratio"),
        ({"model": "pretrained", "backbone": "nope"}, "backbone"),
        ({"epochs": 1.5}, "epochs"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ParameterError, match=match):
        AutoEncoder(**{**FAST, **params}).fit(_gray(np.random.default_rng(0), 4))


def test_bad_input(tmp_path):
    model = AutoEncoder(epochs=1, **FAST)
    with pytest.raises(ParameterError, match="at least 2"):
        model.fit(_gray(np.random.default_rng(0), 1))
    with pytest.raises(ParameterError, match=r"\(n, 3, 32, 32\)"):
        model.fit(np.zeros((4, 3, 64, 64), np.uint8))
    with pytest.raises(ParameterError, match=r"outside \[0, 1\]"):
        model.fit(np.full((4, 3, SIDE, SIDE), 2.0, np.float32))
    with pytest.raises(ParameterError, match="batch_size >= 2"):  # BatchNorm at a 1x1 bottleneck
        AutoEncoder(**{**FAST, "batch_size": 1}).fit(_gray(np.random.default_rng(0), 4))
    good = _write(tmp_path, "good", _gray(np.random.default_rng(0), 3))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png"):
        model.fit_paths([*good, broken])


def test_not_fitted(tmp_path):
    model = AutoEncoder(**FAST)
    images = _gray(np.random.default_rng(0), 2)
    for call in (
        lambda: model.score_images(images),
        lambda: model.reconstruct(images),
        lambda: model.score_paths(["x.png"]),
        lambda: model.predict_paths(["x.png"]),
        lambda: model.save(tmp_path / "m.npz"),
    ):
        with pytest.raises(NotFittedError, match="AutoEncoder is not fitted"):
            call()


# ---------------------------------------------------------------------------------- precision
def test_auto_precision_follows_the_hardware():
    model = AutoEncoder(precision="auto", epochs=1, **FAST).fit(_gray(np.random.default_rng(8), 5))
    assert model.precision_used_ == ("bf16" if native_bf16() else "fp32")


@pytest.mark.skipif(
    not native_bf16(),
    reason="this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16 flag): bf16 would only be emulated",
)
@pytest.mark.slow
def test_bf16_scores_are_close_to_fp32(normal_images):
    kwargs = dict(epochs=2, **RESUME)
    fp32 = AutoEncoder(precision="fp32", **kwargs).fit(normal_images)
    bf16 = AutoEncoder(precision="bf16", **kwargs).fit(normal_images)
    assert bf16.precision_used_ == "bf16"
    test = np.concatenate([_gray(np.random.default_rng(9), 2), _gray(np.random.default_rng(9), 2, square=True)])
    a, b = fp32.score_images(test), bf16.score_images(test)
    assert np.allclose(a["image_scores_mse"], b["image_scores_mse"], rtol=0.1)
    assert np.allclose(a["image_scores_residual"], b["image_scores_residual"], rtol=0.1)
    assert b["image_scores"][2:].min() > b["image_scores"][:2].max()
