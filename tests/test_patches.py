"""Locally aware patch features: shapes, neighbourhood averages on constant/ramp maps, pooling."""

from __future__ import annotations

import pytest
import torch

from anomalib_study.errors import ParameterError
from anomalib_study.patches import PatchFeatures, patch_features


def test_shapes_grid_and_row_order():
    fine = torch.randn(2, 4, 8, 6)
    coarse = torch.randn(2, 6, 4, 3)
    features, grid = patch_features([fine, coarse], patch_size=3)
    assert grid == (8, 6) and features.shape == (2, 48, 10) and features.dtype == torch.float32
    # row i * w + j is grid cell (i, j); p = 1 leaves the finest map untouched
    raw, _ = patch_features([fine, coarse], patch_size=1)
    assert torch.equal(raw[1, 2 * 6 + 5, :4], fine[1, :, 2, 5])


def test_constant_map_interior_and_zero_padded_borders():
    const = torch.full((1, 1, 5, 5), 9.0)
    features, grid = patch_features([const], patch_size=3)
    grid_values = features[0, :, 0].reshape(5, 5)
    assert torch.allclose(grid_values[1:4, 1:4], torch.tensor(9.0))
    # zero padding counted as in Unfold + adaptive pooling (patchcore-inspection) / AvgPool2d(3, 1, 1)
    assert grid_values[0, 0].item() == pytest.approx(9.0 * 4 / 9)
    assert grid_values[0, 2].item() == pytest.approx(9.0 * 6 / 9)


def test_ramp_is_kept_by_the_neighbourhood_average():
    ramp = torch.arange(7.0).repeat(7, 1)[None, None]  # value = column index
    features, _ = patch_features([ramp], patch_size=3)
    grid_values = features[0, :, 0].reshape(7, 7)
    assert torch.allclose(grid_values[1:-1, 1:-1], ramp[0, 0, 1:-1, 1:-1])
    features5, _ = patch_features([ramp], patch_size=5)
    assert torch.allclose(features5[0, :, 0].reshape(7, 7)[2:-2, 2:-2], ramp[0, 0, 2:-2, 2:-2])


def test_coarse_constant_map_is_upsampled_to_the_fine_grid():
    fine = torch.zeros(1, 2, 8, 8)
    coarse = torch.full((1, 3, 4, 4), 5.0)
    features, grid = patch_features([fine, coarse], patch_size=1)
    assert grid == (8, 8)
    assert torch.allclose(features[0, :, 2:], torch.tensor(5.0))


def test_channel_pooling_per_layer_and_target():
    x = torch.arange(1.0, 5.0).reshape(1, 4, 1, 1)  # channels 1, 2, 3, 4
    features, _ = patch_features([x], patch_size=1, per_layer_dim=2)
    assert features[0, 0].tolist() == [1.5, 3.5]
    y = torch.full((1, 2, 1, 1), 10.0)
    features, _ = patch_features([x, y], patch_size=1, per_layer_dim=2, target_dim=2)
    assert features[0, 0].tolist() == [2.5, 10.0]  # [1.5, 3.5, 10, 10] pooled to 2
    native, _ = patch_features([x, y], patch_size=1)
    assert native.shape[-1] == 6  # None keeps the native channels (no pooling up)


def test_patch_features_class_takes_named_maps():
    maps = {"a": torch.randn(1, 3, 4, 4), "b": torch.randn(1, 5, 2, 2), "embedding": torch.randn(1, 7)}
    maker = PatchFeatures(layers=["a", "b"], patch_size=3, per_layer_dim=2)
    features, grid = maker(maps)
    assert features.shape == (1, 16, 4) and grid == (4, 4)
    assert maker.output_dim([3, 5]) == 4 and PatchFeatures().output_dim([40, 112]) == 152
    with pytest.raises(ParameterError, match="missing"):
        maker({"a": maps["a"]})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"patch_size": 2}, "patch_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"per_layer_dim": 0}, "per_layer_dim"),
        ({"target_dim": 1.5}, "target_dim"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        patch_features([torch.zeros(1, 2, 4, 4)], **kwargs)


def test_bad_maps():
    with pytest.raises(ParameterError, match="non-empty list"):
        patch_features([])
    with pytest.raises(ParameterError, match=r"\(B, C, h, w\)"):
        patch_features([torch.zeros(2, 4, 4)])
    with pytest.raises(ParameterError, match="batch sizes"):
        patch_features([torch.zeros(1, 2, 4, 4), torch.zeros(2, 2, 2, 2)])
