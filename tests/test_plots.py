from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from anomalib_study import plots


def _image(path, size=(300, 200)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


def test_roc_and_histogram_are_figures():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert isinstance(plots.roc_figure({"x": (labels, scores)}), Figure)
    fig = plots.score_histogram(scores, ["good", "good", "crack", "crack"], threshold=0.5)
    assert isinstance(fig, Figure)
    assert any(abs(line.get_xdata()[0] - 0.5) < 1e-9 for line in fig.axes[0].lines)


def test_roc_figure_skips_a_single_class_curve():
    fig = plots.roc_figure({"only normal": (np.zeros(3), np.arange(3.0))})
    assert len(fig.axes[0].lines) == 1  # the chance diagonal only


def test_thumbnails_are_small_jpegs(tmp_path):
    path = _image(tmp_path / "a.png", (600, 400))
    uri = plots.thumbnail(path, size=96)
    assert uri.startswith("data:image/jpeg;base64,")
    raw = base64.b64decode(uri.split(",", 1)[1])
    assert len(raw) < 12_000
    html = plots.thumbnails_html([path, path], ["crack 0.91", "<good>"], size=96)
    assert html.count("<img") == 2 and "&lt;good&gt;" in html


def test_overlay_marks_the_mask_outline_and_follows_the_map(tmp_path):
    path = _image(tmp_path / "b.png", (320, 240))
    preprocessing = {"resize": 64, "crop": 56}
    crop = plots.crop_like_input(path, preprocessing)
    assert crop.size == (56, 56)
    amap = np.zeros((56, 56), dtype=np.float32)
    amap[:, 28:] = 1.0  # right half anomalous
    mask = np.zeros((56, 56), dtype=bool)
    mask[10:30, 10:30] = True
    out = np.asarray(plots.overlay_image(crop, amap, mask))
    assert out.shape == (56, 56, 3)
    assert (out[10, 10:30] == 255).all()  # outline drawn in white
    assert out[40:, 40:, 0].mean() > out[40:, :20, 0].mean()  # jet: high values are red
    html = plots.overlays_html([path], amap[None], [mask], ["crack 0.9"], preprocessing, size=48)
    assert html.count("<img") == 2 and "crack 0.9" in html


# ------------------------------------------------------------------------------ anomaly clustering
def test_confusion_heatmap_annotates_every_cell():
    fig = plots.plot_confusion([[3, 0, 1], [0, 4, 2]], [0, 1], ["good", "blob", "spot"], title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["3", "0", "1", "0", "4", "2"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["cluster 0", "cluster 1"]


def _curve(peak_at):
    relatives = [0.0, 0.1, 0.5, 1.0, 2.0, 10.0, "inf"]  # infinity as metrics files store it
    return [
        {
            "tau": None if r == "inf" else r * 0.3,
            "relative": r,
            "nmi": 0.9 if r == peak_at else 0.4,
            "ari": 0.3,
            "f1": 0.5,
        }
        for r in relatives
    ][::-1]


def test_tau_curve_has_a_panel_per_scored_mode_and_marks_chosen_and_oracle():
    fig = plots.plot_tau_curve(
        {"unsupervised": _curve(2.0), "semi_supervised": _curve(0.0), "average": []},
        {"unsupervised": 1.0, "semi_supervised": 1.0},
    )
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # average has no curve
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0].startswith("0") and labels[-1].startswith("inf") and "1" in labels
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("oracle (labels)") for t in legend) and "chosen tau (label-free)" in legend
    star = next(line for line in ax.lines if line.get_marker() == "*")
    assert star.get_xdata()[0] == 2.0 and star.get_ydata()[0] == 0.9
    # the oracle at tau = 0 sits at the left end, below the smallest finite value
    star = next(line for line in fig.axes[1].lines if line.get_marker() == "*")
    assert star.get_xdata()[0] < 0.1
    # float infinity and None are read as infinity too
    curve = [{**p, "relative": float("inf")} if p["relative"] == "inf" else p for p in _curve("inf")]
    fig = plots.plot_tau_curve({"unsupervised": curve}, {"unsupervised": 1.0})
    star = next(line for line in fig.axes[0].lines if line.get_marker() == "*")
    assert star.get_xdata()[0] > 10.0
    # a run without any curve still gives a figure
    assert isinstance(plots.plot_tau_curve({"average": []}, {}), Figure)


def test_thumbnail_sheet_has_a_row_per_cluster_and_marks_unreadable_images(tmp_path):
    good = [_image(tmp_path / f"{i}.png", (120, 80)) for i in range(3)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    fig = plots.cluster_thumbnail_sheet(
        {0: good, 1: [good[0], broken], 2: good * 6}, max_per_cluster=4, thumb=32, titles={0: ["a", "b", "c"]}
    )
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["cluster 0 (3 images)", "cluster 1 (2 images, 1 unreadable)", "cluster 2 (18 images, 4 shown)"]
    assert [t.get_text() for t in fig.axes[0].texts] == ["a", "b", "c"]
    assert [t.get_text() for t in fig.axes[1].texts] == ["unreadable"]
    strip = fig.axes[1].images[0].get_array()
    assert strip.shape[:2] == (32, 4 * (32 + 2) - 2)  # as wide as the widest row
    assert (np.asarray(strip[:, 34:66]) != 255).any()  # the placeholder is drawn, not left blank


def test_embedding_projection_has_one_series_per_label():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (5, 8)), rng.normal(6, 1, (4, 8))])
    fig = plots.plot_embedding_2d(X, ["blob"] * 5 + ["spot"] * 4, title="PCA")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["blob (5)", "spot (4)"]
    assert len(fig.axes[0].collections) == 2


def test_weight_maps_one_axes_per_image_with_the_mask_outline(tmp_path):
    from PIL import Image

    images = [Image.open(_image(tmp_path / f"{i}.png", (40, 40))) for i in range(7)]
    weights = np.full((7, 16), 1 / 16)
    weights[0] = 0
    weights[0, 5] = 1.0
    mask = np.zeros((20, 20), dtype=bool)  # another size than the image: resized
    mask[5:10, 5:10] = True
    fig = plots.plot_weight_maps(
        images, weights, (4, 4), masks=[mask] + [None] * 6, titles=[f"im {i}" for i in range(7)]
    )
    assert isinstance(fig, Figure) and len(fig.axes) == 7  # 6 per row, the unused slot removed
    first = fig.axes[0]
    assert len(first.images) == 2 and first.images[1].get_array().shape == (40, 40)
    assert len(first.collections) == 1 and not fig.axes[1].collections  # the mask outline, where there is a mask
    assert "im 0" in first.get_title() and "max alpha 1.000" in first.get_title()


def test_figure_jpeg_is_a_small_jpeg(tmp_path):
    paths = [_image(tmp_path / f"{i}.png", (200, 200)) for i in range(6)]
    fig = plots.cluster_thumbnail_sheet({0: paths, 1: paths}, thumb=72)
    data = plots.figure_jpeg(fig, quality=70)
    assert data[:2] == b"\xff\xd8"  # JPEG start-of-image marker
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=fig.dpi)
    assert len(data) < len(png.getvalue())


def test_auroc_heatmap_shows_each_value_and_leaves_missing_ones_blank():
    values = np.array([[0.91, np.nan], [0.55, 0.999]])
    fig = plots.plot_auroc_heatmap(values, ["kNN · b1", "PatchCore · b1"], ["bottle", "tile"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "data set" and ax.get_ylabel() == "method · backbone / variant"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bottle", "tile"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["kNN · b1", "PatchCore · b1"]
    assert sorted(t.get_text() for t in ax.texts) == ["0.550", "0.910", "0.999"]  # no text for the missing cell
    mesh = ax.collections[0].get_array().reshape(2, 2)  # the colours drawn: the values, the missing one masked
    assert mesh.mask[0, 1] and not mesh.mask[1].any() and abs(mesh[0, 0] - 0.91) < 1e-12


def test_auroc_vs_speed_is_a_log_scatter_with_one_point_per_report():
    fig = plots.plot_auroc_vs_speed(
        [0.9, 0.8, 0.7], [2.0, 20.0, 200.0], ["kNN", "PatchCore", "kNN"], ["b1", "b1", "b2"]
    )
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "image AUROC"
    assert "images per second" in ax.get_xlabel()
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert sorted(map(tuple, points.tolist())) == [(2.0, 0.9), (20.0, 0.8), (200.0, 0.7)]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"kNN", "PatchCore", "b1", "b2"} <= set(legend)
    empty = plots.plot_auroc_vs_speed([], [], [], [])
    assert "no report" in empty.axes[0].texts[0].get_text()
