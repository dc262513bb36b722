from anomalib_study.published import (
    DN2_ACCURACY,
    anomaly_clustering_comparison,
    autoencoder_comparison,
    dn2_comparison,
    patchcore_comparison,
)


def _metrics(layout, name, backbone="efficientnet_lite0", synthetic=False, **extra):
    return {
        "dataset": {"name": name, "layout": layout},
        "synthetic": synthetic,
        "backbone": {"name": backbone, "label": backbone},
        "n_train": 50,
        "k_used": 49,
        "params": {"thres_ratio": 0.92, "coreset_ratio": 0.1},
        "accuracy": 0.8,
        "image_auroc": 0.9,
        **extra,
    }


def test_dn2_rows_say_what_differs():
    rows = dn2_comparison(_metrics("dagm", "synthetic_dagm", synthetic=True))
    assert rows[1]["accuracy"] == DN2_ACCURACY["DAGM"]
    assert "synthetic" in rows[1]["what differs"] and "k = 49" in rows[1]["what differs"]
    assert "CLIP" in rows[1]["what differs"]
    assert "no published" in dn2_comparison(_metrics("kolektorsdd", "kolektorsdd"))[1]["what differs"]


def test_patchcore_rows_for_bottle_include_the_mvtec_mean():
    rows = patchcore_comparison(_metrics("mvtec_ad", "mvtec_ad/bottle", pixel_auroc=0.97, pro=0.9))
    assert [r["data"] for r in rows[1:]] == ["mvtec_ad/bottle", "mvtec_ad/mean"]
    assert rows[1]["image_auroc"] == 1.0 and rows[2]["pro"] == 0.931
    assert "coreset 10 % vs 1 %" in rows[1]["what differs"]
    assert "no published" in patchcore_comparison(_metrics("mvtec_3d", "mvtec_3d/tire"))[1]["what differs"]


def test_patchcore_rows_say_when_the_input_was_squashed():
    squashed = _metrics("magnetic_tile", "magnetic_tile")
    squashed["backbone"].update(
        image_size=224, preprocessing={"resize": [224, 224], "crop": 224, "resize_mode": "squash"}
    )
    rows = patchcore_comparison(squashed)
    assert rows[1]["image_auroc"] == 0.979 and "squashed to 224 x 224" in rows[1]["what differs"]
    assert "squashed" not in patchcore_comparison(_metrics("magnetic_tile", "magnetic_tile"))[1]["what differs"]


def test_patchcore_rows_name_an_aspect_kept_input_and_a_matching_coreset():
    kept = _metrics("magnetic_tile", "magnetic_tile", backbone="dinov2_vits14")
    kept["backbone"].update(image_size=448, preprocessing={"resize": 448, "crop": None, "resize_mode": "keep"})
    ours, paper = patchcore_comparison(kept)
    assert ours["coreset"] == paper["coreset"] == "10 %" and "coreset" not in paper["what differs"]
    assert "shorter side resized to 448 px, aspect ratio kept" in paper["what differs"]
    assert "squashed" not in paper["what differs"] and "WideResNet-50" in paper["what differs"]


def _autoencoder_metrics(model):
    metrics = _metrics(
        "dagm",
        "synthetic_dagm",
        synthetic=True,
        image_auroc_residual=0.91,
        image_auroc_mse=0.72,
        epochs_run=3,
        fit_timings={"train_s": 90.0},
        environment={"cpu_count": 2, "device": "cpu"},
    )
    metrics["backbone"]["label"] = "EfficientNet-Lite0 (ImageNet)"
    metrics["params"].update(model=model, loss="mse_ssim", ssim_weight=0.5)
    return metrics


def test_autoencoder_rows_are_published_ranges_on_other_data():
    rows = autoencoder_comparison(_autoencoder_metrics("pretrained"))
    ours, published = rows[:2], rows[2:]
    assert [(r["score"], r["image_auroc"]) for r in ours] == [("residual", 0.91), ("mse", 0.72)]
    assert (
        ours[0]["data"] == "synthetic_dagm (synthetic)" and "1.5 min on a 2-core CPU, 3 epochs" == ours[0]["training"]
    )
    assert len(published) == 8 and {r["source"] for r in published} == {"published (seed work)"}
    by_key = {(r["model"], r["loss"], r["data"]): r for r in published}
    assert by_key[("CAE", "MSE", "MVTec AD hazelnut")]["image_auroc"] == "0.70-0.80"
    assert by_key[("CAE", "SSIM", "MVTec AD zipper")]["image_auroc"] == "0.65-0.75"
    assert by_key[("ResNet", "MSE", "MVTec AD zipper")]["image_auroc"] == "0.70-0.80"
    assert by_key[("ResNet", "SSIM", "MVTec AD hazelnut")]["image_auroc"] == "0.85-0.90"
    assert by_key[("ResNet", "SSIM", "MVTec AD zipper")]["image_auroc"] == "0.75-0.85+"
    resnet = by_key[("ResNet", "MSE", "MVTec AD hazelnut")]["what differs"]
    assert "not available here" in resnet and "RTX 3050" in resnet and "2-core CPU" in resnet
    assert "ResNet-18" in resnet and "EfficientNet-Lite0" in resnet
    assert all(r["training"] == "8-15 min on an RTX 3050 GPU" for r in published)
    conv = autoencoder_comparison(_autoencoder_metrics("conv"))
    assert conv[0]["model"].startswith("CAE") and "ResNet-18" not in conv[2]["what differs"]


def test_anomaly_clustering_rows_put_our_category_first_and_say_what_differs():
    metrics = _metrics(
        "mvtec_ad",
        "mvtec_ad/bottle",
        protocol={"name": "reproduction"},
        modes={
            "unsupervised": {"tau": 0.42, "nmi": 0.5, "ari": 0.4, "f1": 0.6},
            "average": {"tau": None, "nmi": 0.3, "ari": 0.2, "f1": 0.4},
        },
    )
    rows = anomaly_clustering_comparison(metrics)
    assert [(r["source"], r["mode"], r["nmi"]) for r in rows[:2]] == [
        ("this run", "unsupervised", 0.5),
        ("this run", "average", 0.3),
    ]
    assert "label-free" in rows[0]["tau"] and rows[1]["tau"] == "uniform weights (no tau)"
    published = rows[2:]
    assert [(r["data"], r["mode"], r["nmi"]) for r in published[:2]] == [
        ("mvtec_ad/bottle", "unsupervised", 0.578),
        ("mvtec_ad/bottle", "semi_supervised", 0.680),
    ]
    assert published[0]["ari"] == 0.460 and published[0]["f1"] == 0.687
    assert "DINO ViT-B/8 (weights not available here)" in published[0]["what differs"]
    assert "mode semi_supervised not run here" in published[1]["what differs"]
    means = [r for r in published if "mean" in r["data"]]
    assert {r["nmi"] for r in means if r["source"].startswith("published (Sohn")} == {0.451, 0.577, 0.674, 0.669}
    assert all("only some are here" in r["what differs"] for r in means)


def test_anomaly_clustering_nearest_only_keeps_our_category_and_its_family():
    metrics = _metrics(
        "mvtec_ad",
        "mvtec_ad/bottle",
        protocol={"name": "reproduction"},
        modes={"unsupervised": {"tau": 0.42, "nmi": 0.5, "ari": 0.4, "f1": 0.6}},
    )
    every = anomaly_clustering_comparison(metrics)
    nearest = anomaly_clustering_comparison(metrics, nearest_only=True)
    assert nearest == [r for r in every if "textures" not in r["data"] and "transistor" not in r["data"]]
    assert {r["data"] for r in nearest[1:]} == {"mvtec_ad/bottle", "MVTec AD objects (mean)"}
