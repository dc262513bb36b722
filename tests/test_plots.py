from __future__ import annotations

import base64

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
