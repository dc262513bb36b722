from anomalib_study.published import DN2_ACCURACY, dn2_comparison, patchcore_comparison


def _metrics(layout, name, backbone="efficientnet_lite0", synthetic=False, **extra):
    return {
        "dataset": {"name": name, "layout": layout}, "synthetic": synthetic,
        "backbone": {"name": backbone, "label": backbone}, "n_train": 50, "k_used": 49,
        "params": {"thres_ratio": 0.92, "coreset_ratio": 0.1}, "accuracy": 0.8, "image_auroc": 0.9, **extra,
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
    squashed["backbone"].update(image_size=224, preprocessing={"resize": [224, 224], "crop": 224, "resize_mode": "squash"})
    rows = patchcore_comparison(squashed)
    assert rows[1]["image_auroc"] == 0.979 and "squashed to 224 x 224" in rows[1]["what differs"]
    assert "squashed" not in patchcore_comparison(_metrics("magnetic_tile", "magnetic_tile"))[1]["what differs"]
