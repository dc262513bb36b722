"""resize_mode="keep" (issue 13) across the layers: the geometry function, CNN and ViT forwards on
non-square inputs, batching by shape, PatchCore end to end with per-image maps, masks, pixel
metrics and overlays at each image's own geometry, and the clear refusals. Tiny images only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from test_backbones import make_weights

from anomalib_study.backbones import KEEP_MAX_ASPECT, RESIZE_MODES, input_size, keep_size, load_backbone
from anomalib_study.errors import ParameterError


# ---------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    "height,width,size,stride,expected",
    [
        (64, 64, 64, 16, (64, 64)),  # square stays square
        (64, 160, 64, 16, (64, 160)),  # 1:2.5, already on the stride
        (500, 1250, 224, 16, (224, 560)),  # KolektorSDD-like strip
        (1250, 500, 224, 14, (560, 224)),  # portrait keeps its orientation; 560 = 224 + 24 * 14
        (100, 150, 224, 14, (224, 336)),  # 1.5 x 224 = 336 = 224 + 8 * 14
        (100, 151, 224, 32, (224, 352)),  # 338.2 -> nearest 224 + k * 32 is 352
        (100, 137, 224, 32, (224, 320)),  # 306.9 -> 320 (k = 3)
        (100, 300, 224, 14, (224, 672)),  # exactly at the 3x cap
        (100, 1000, 224, 14, (224, 672)),  # 1:10 capped at 3x (squeezed along its length)
        (100, 1000, 224, 48, (224, 656)),  # the capped side rounds down: 672 is not 224 + k * 48
        (60, 61, 224, 14, (224, 224)),  # less than half a stride longer: square
    ],
)
def test_keep_size_by_hand(height, width, size, stride, expected):
    assert keep_size(height, width, size, stride) == expected
    h, w = keep_size(height, width, size, stride)
    assert min(h, w) == size and max(h, w) <= KEEP_MAX_ASPECT * size and (max(h, w) - size) % stride == 0


def test_keep_size_cap_and_bad_arguments():
    assert keep_size(10, 40, 32, 8, max_aspect=2.0) == (32, 64)
    assert keep_size(10, 40, 32, 8, max_aspect=1) == (32, 32)  # a cap of 1 is squash
    for args, name in (((0, 5, 32, 8), "height"), ((5, 5, 32, 0), "stride"), ((5, 5.5, 32, 8), "width")):
        with pytest.raises(ParameterError, match=name):
            keep_size(*args)
    with pytest.raises(ParameterError, match="max_aspect"):
        keep_size(5, 5, 32, 8, max_aspect=0.5)
    assert "keep" in RESIZE_MODES
    assert input_size({"crop": 56, "resize": 64}, 10, 400) == (56, 56)  # crop / squash: the square side


# ---------------------------------------------------------------------------------- backbones
@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def _picture(height, width, seed=0, bright_right=False):
    pixels = np.random.default_rng(seed).integers(60, 120, (height, width, 3), dtype=np.uint8)
    if bright_right:
        pixels[:, -width // 5 :] = 255
    return Image.fromarray(pixels)


def test_cnn_under_keep_sees_the_whole_image_on_a_longer_grid(resnet_weights):
    net = load_backbone("resnet18", weights=resnet_weights, image_size=64, resize_mode="keep")
    pre = net.preprocessing
    assert pre["resize_mode"] == "keep" and pre["stride"] == 16 and pre["crop"] is None  # layer3: stride 16
    assert pre["max_aspect"] == KEEP_MAX_ASPECT
    image = _picture(64, 160, bright_right=True)  # a bright band at the right end, which a centre crop cuts off
    x = net.transform(image)
    assert x.shape == (3, 64, 160)
    assert x[:, :, -5:].mean() > 1.0  # the band is still there
    out = net(x[None], layers=["layer2", "layer3"])
    assert out["layer2"].shape[-2:] == (8, 20) and out["layer3"].shape[-2:] == (4, 10)
    assert out["embedding"].shape == (1, net.embedding_dim)


def test_vit_under_keep_resamples_its_position_embeddings(tmp_path):
    path = make_weights("dino_vits8", tmp_path)
    crop = load_backbone("dino_vits8", weights=path, image_size=64)
    keep = load_backbone("dino_vits8", weights=path, image_size=64, resize_mode="keep")
    assert keep.model.dynamic_img_size and not crop.model.dynamic_img_size  # timm's own mechanism, keep only
    assert keep.preprocessing["stride"] == 8  # the patch size
    torch.manual_seed(0)
    square = torch.randn(1, 3, 64, 64)
    a, b = crop(square, layers=["block5"]), keep(square, layers=["block5"])
    assert torch.equal(a["block5"], b["block5"]) and torch.equal(a["embedding"], b["embedding"])
    x = keep.transform(_picture(64, 160))
    assert x.shape == (3, 64, 160)
    out = keep(x[None], layers=["block5", "block8"])
    assert out["block5"].shape == (1, 384, 8, 20) and out["block8"].shape == (1, 384, 8, 20)
    with pytest.raises(AssertionError):  # the square model refuses another size: keep is what allows it
        crop(torch.randn(1, 3, 64, 160), layers=["block5"])
    with pytest.raises(ParameterError, match=r"multiple of 8 .* got 60: use 56 or 64"):  # the grid must tile it
        load_backbone("dino_vits8", weights=path, image_size=60, resize_mode="keep")


def test_clip_refuses_keep():
    with pytest.raises(ParameterError, match="resize_mode='crop'"):
        load_backbone("clip_vit_b32", resize_mode="keep")


# ---------------------------------------------------------------------------------- batching
def _write(folder, shapes, seed=0, defect=()):
    """Grey noise PNGs of the given (h, w); images whose index is in ``defect`` get a white square."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(shapes):
        pixels = (110 + 20 * rng.standard_normal((h, w))).clip(0, 255).astype(np.uint8)
        if i in defect:
            pixels[h // 3 : h // 3 + 16, w - 32 : w - 16] = 255
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


SHAPES = [(64, 160), (96, 64), (64, 64), (64, 160), (70, 64), (64, 64), (64, 161)]


def test_shape_batches_group_by_shape_in_order(tmp_path, resnet_weights):
    from anomalib_study.features import shape_batches

    net = load_backbone("resnet18", weights=resnet_weights, image_size=64, resize_mode="keep")
    paths = _write(tmp_path, SHAPES)
    # 64x160 and 64x161 share an input shape; 70x64 rounds to 64x64 (70 is nearer 64 than 80)
    assert shape_batches(paths, net.preprocessing, batch_size=2) == [[0, 3], [6], [1], [2, 4], [5]]


def test_grouped_batching_equals_one_by_one_extraction(tmp_path, resnet_weights):
    from anomalib_study.features import extract_embeddings

    net = load_backbone("resnet18", weights=resnet_weights, image_size=64, resize_mode="keep")
    paths = _write(tmp_path, SHAPES)
    batched = extract_embeddings(net, paths, batch_size=3, cache=None, progress=False)
    with torch.no_grad():
        single = np.stack(
            [net(net.transform(Image.open(p).convert("RGB"))[None])["embedding"][0].numpy() for p in paths]
        )
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)


def test_collect_patch_features_refuses_mixed_grids(tmp_path, resnet_weights):
    from anomalib_study.patches import PatchFeatures, collect_patch_features

    net = load_backbone("resnet18", weights=resnet_weights, image_size=64, resize_mode="keep")
    paths = _write(tmp_path, SHAPES[:2])
    with pytest.raises(ParameterError, match="patch grids"):
        collect_patch_features(net, paths, PatchFeatures(), progress=False)


# ---------------------------------------------------------------------------------- PatchCore
@pytest.fixture(scope="module")
def keep_model(tmp_path_factory):
    from anomalib_study.methods.patchcore import PatchCore

    folder = tmp_path_factory.mktemp("keep_images")
    train = _write(folder / "train", SHAPES * 2, seed=1)
    test = _write(folder / "test", SHAPES[:6], seed=2, defect=(3, 4, 5))
    backbone = load_backbone("efficientnet_lite0", image_size=64, resize_mode="keep")
    model = PatchCore(backbone=backbone, coreset_ratio=0.5, calibration_fraction=0.2, progress=False).fit_paths(train)
    return model, train, test


def test_patchcore_keep_end_to_end_maps_at_each_images_shape(keep_model, tmp_path):
    from anomalib_study.methods.patchcore import PatchCore
    from anomalib_study.metrics import image_auroc

    model, train, test = keep_model
    assert model.grid_shape_ is None and model.n_train_images_ == len(train)
    # stage2 (stride 8) sets the grid: 64x160 -> 8x20, 96x64 -> 12x8, 64x64 -> 8x8 (three of each in the bank)
    grids = {(64, 160): 160, (96, 64): 96, (64, 64): 64}
    held = set(model.calibration_images(len(train)).tolist())
    expected_patches = sum(grids[keep_size(h, w, 64, 16)] for i, (h, w) in enumerate(SHAPES * 2) if i not in held)
    assert model.n_train_patches_ == expected_patches
    out = model.score_paths(test, keep_patch_scores=True)
    expected = [keep_size(h, w, 64, 16) for h, w in SHAPES[:6]]
    assert [m.shape for m in out["anomaly_maps"]] == expected
    assert [p.shape for p in out["patch_scores"]] == [(h // 8, w // 8) for h, w in expected]
    assert image_auroc([0, 0, 0, 1, 1, 1], out["image_scores"]) == 1.0
    square = model.score_paths(test[:2], size=(32, 32))["anomaly_maps"]  # an explicit size: one array
    assert square.shape == (2, 32, 32)

    path = model.save(tmp_path / "keep.npz")
    again = PatchCore.load(path)  # the backbone is rebuilt by name with resize_mode="keep"
    assert again.resize_mode == "keep" and again.grid_shape_ is None
    assert again.get_backbone().preprocessing == model.get_backbone().preprocessing
    np.testing.assert_allclose(again.score_paths(test)["image_scores"], out["image_scores"], rtol=1e-5)
    crop = load_backbone("efficientnet_lite0", image_size=64)
    from anomalib_study.errors import ModelFileError

    with pytest.raises(ModelFileError, match="preprocessing"):
        PatchCore.load(path, backbone=crop)


def test_old_patchcore_files_still_load(keep_model, tmp_path):
    """A file written before "keep" existed (grid_shape_ a list, no keep fields) loads as before."""
    from anomalib_study.methods.patchcore import PatchCore

    rng = np.random.default_rng(0)
    model = PatchCore(coreset_ratio=1.0, calibration_fraction=0.0, sigma=0, progress=False).fit(
        rng.normal(size=(3, 4, 2)).astype(np.float32)
    )
    path = model.save(tmp_path / "old.npz")
    loaded = PatchCore.load(path)
    assert loaded.grid_shape_ == (2, 2) and loaded.resize_mode == "crop"
    np.testing.assert_array_equal(loaded.score_patches(rng.normal(size=(1, 4, 2)))[0].shape, (1, 4))


# ---------------------------------------------------------------------------------- masks, metrics, overlays
def test_masks_follow_the_keep_geometry(tmp_path):
    """A 50 x 200 image whose defect fills columns 150..199: a centre crop loses it; under keep
    (shorter side 40, stride 8, capped at 3x: 40 x 120) it lands on columns 90..119."""
    from anomalib_study.backbones import keep_preprocessing
    from anomalib_study.data import ImageRecord
    from anomalib_study.evaluate import masks_like_input
    from anomalib_study.plots import crop_like_input

    mask = np.zeros((50, 200), dtype=np.uint8)
    mask[10:40, 150:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((50, 200, 3), np.uint8)).save(tmp_path / "i.png")
    Image.fromarray(np.zeros((60, 30, 3), np.uint8)).save(tmp_path / "n.png")
    records = [
        ImageRecord(tmp_path / "i.png", "test", 1, mask_path=tmp_path / "m.png"),
        ImageRecord(tmp_path / "n.png", "test", 0),
    ]
    crop = {"resize": 50, "crop": 40, "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3}
    assert not masks_like_input(records[:1], crop).any()
    keep = keep_preprocessing(crop, stride=8)
    out = masks_like_input(records, keep)
    assert out.dtype == object and out[0].shape == (40, 120) and out[1].shape == (80, 40)
    columns = np.flatnonzero(out[0].any(axis=0))
    assert columns.min() == 90 and columns.max() == 119 and not out[1].any()
    rows = np.flatnonzero(out[0].any(axis=1))
    assert rows.min() == 8 and rows.max() == 31  # rows 10..39 of 50 -> 8..31 of 40
    assert crop_like_input(tmp_path / "i.png", keep).size == (120, 40)  # overlays: the same geometry


def test_pixel_metrics_on_images_of_their_own_shapes():
    from anomalib_study.metrics import pixel_auroc, pixel_f1_max, pro_score

    masks = [np.zeros((4, 10), bool), np.zeros((6, 3), bool)]
    masks[0][1:3, 7:9] = True
    masks[1][0, 0] = True
    perfect = [m.astype(float) for m in masks]
    assert pixel_auroc(masks, perfect) == 1.0 and pro_score(masks, perfect) == 1.0
    assert pixel_f1_max(masks, perfect)[0] == 1.0
    rng = np.random.default_rng(0)
    maps = [rng.random(m.shape) for m in masks]
    from sklearn.metrics import roc_auc_score

    flat_masks = np.concatenate([m.ravel() for m in masks])
    assert pixel_auroc(masks, maps) == pytest.approx(
        roc_auc_score(flat_masks, np.concatenate([m.ravel() for m in maps]))
    )
    # images of one shape given one by one (object arrays: the per-image path) give exactly the array's figures
    same_masks, same_maps = np.stack([masks[0], masks[0][::-1]]), np.stack([maps[0], rng.random((4, 10))])
    object_masks, object_maps = np.empty(2, dtype=object), np.empty(2, dtype=object)
    object_masks[:], object_maps[:] = list(same_masks), list(same_maps)
    for metric in (pixel_auroc, pro_score, pixel_f1_max):
        assert metric(object_masks, object_maps) == metric(same_masks, same_maps)
    with pytest.raises(ParameterError, match="mask 1"):
        pixel_auroc(masks, [maps[0], maps[1].T])


def test_overlays_are_written_at_each_maps_shape(tmp_path):
    from anomalib_study.backbones import keep_preprocessing
    from anomalib_study.detect import write_overlays

    paths = _write(tmp_path / "images", [(64, 160), (96, 64)])
    pre = keep_preprocessing(
        {"resize": 64, "crop": 64, "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3}, stride=16
    )
    maps = [np.random.default_rng(0).random(input_size(pre, h, w)).astype(np.float32) for h, w in [(64, 160), (96, 64)]]
    written = write_overlays(
        tmp_path / "overlays", paths, tmp_path / "images", maps, [2.0, 1.0], pre, 0.0, 1.0, progress=False
    )
    assert [Image.open(p).size for p in written] == [(160, 64), (64, 96)]


def test_evaluate_patchcore_keep_with_pixel_metrics(tmp_path):
    """evaluate end to end on a synthetic set stretched to 64 x 128 (images and masks alike)."""
    from anomalib_study.data.synthetic import make_synthetic_dagm
    from anomalib_study.evaluate import evaluate

    root = make_synthetic_dagm(
        tmp_path / "synthetic", seed=0, n_classes=1, n_train=8, n_test_normal=3, n_test_defect=3, image_size=64
    )
    for path in root.rglob("*"):
        if path.suffix.lower() == ".png":
            Image.open(path).resize((128, 64), Image.BILINEAR).save(path)
        elif path.name == "Labels.txt":  # DAGM ellipse labels: move each centre along with the stretch
            lines = []
            for line in path.read_text().splitlines():
                fields = line.split("\t")
                if len(fields) == 6:
                    fields[4] = str(2 * float(fields[4]))
                lines.append("\t".join(fields))
            path.write_text("\n".join(lines) + "\n")
    metrics = evaluate(
        "patchcore",
        "dagm",
        root,
        category="Class1",
        image_size=64,
        resize_mode="keep",
        coreset_ratio=0.5,
        progress=False,
        return_maps=True,
        out=tmp_path / "run",
    )
    assert metrics["backbone"]["preprocessing"]["resize_mode"] == "keep" and metrics["grid_shape"] is None
    assert all(m.shape == (64, 128) for m in metrics["anomaly_maps"])
    assert all(m.shape == (64, 128) for m in metrics["masks"])
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0 and 0.0 <= metrics["pro"] <= 1.0
    assert "aspect ratio kept" in metrics["pixel_metrics_note"] and "crop" not in metrics["pixel_metrics_note"]
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["pixel_auroc"] == metrics["pixel_auroc"]


def test_clustering_and_the_coreset_ablation_refuse_keep(resnet_weights):
    from anomalib_study.evaluate import patchcore_coreset_ablation
    from anomalib_study.methods.clustering import AnomalyClustering

    with pytest.raises(ParameterError, match="resize_mode='keep'"):
        AnomalyClustering(resize_mode="keep")._validate_params()
    net = load_backbone("resnet18", weights=resnet_weights, image_size=64, resize_mode="keep")
    with pytest.raises(ParameterError, match="one patch grid"):
        patchcore_coreset_ablation(None, net)


def test_detect_database_records_keep_and_overlays_keep_each_shape(tmp_path):
    from anomalib_study.detect import detect_abnormal, load_database

    _write(tmp_path / "images", SHAPES, seed=3)
    _write(tmp_path / "test", [(64, 160), (96, 64)], seed=4, defect=(0, 1))
    params = dict(
        db_dir=tmp_path / "db",
        image_dir=tmp_path / "images",
        method="patchcore",
        image_size=64,
        calibration_fraction=0.3,
        num_workers=0,
        batch_size=4,
        progress=False,
        resize_mode="keep",
    )
    run = detect_abnormal(tmp_path / "test", result_dir=tmp_path / "r1", **params)
    config = json.loads((run / "config.json").read_text())
    assert config["preprocessing"]["resize_mode"] == "keep" and config["grid_shape"] is None
    assert load_database(tmp_path / "db").resize_mode == "keep"
    sizes = sorted(
        Image.open(run / "overlays" / row).size
        for row in __import__("pandas").read_csv(run / "overlays" / "overlays.csv")["overlay"]
    )
    assert sizes == [(64, 96), (160, 64)] and config["overlays"]["count"] == 2
    params.pop("resize_mode")  # not given: the database's own "keep" backbone is used again
    again = detect_abnormal(tmp_path / "test", result_dir=tmp_path / "r2", **params)
    assert (again / "scores.csv").read_text() == (run / "scores.csv").read_text()
