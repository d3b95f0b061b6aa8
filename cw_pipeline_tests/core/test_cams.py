"""Tests for cw_pipeline.core.cams: CAMs (Eq. 1), their normalisation and CAM boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cw_pipeline.core.cams import (
    BOX_THRESHOLDS,
    boxes_to_pixels,
    class_activation_maps,
    compute_cams,
    heatmap_boxes,
    largest_component_box,
    mean_cam,
    normalize_cams,
    pixels_to_cells,
    top_classes,
)


def _loop_cams(a: torch.Tensor, w: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
    """Reference CAM_c = Σ_k w[c, k] · A_k with explicit loops over images, classes, channels."""
    n, k, h, wd = a.shape
    out = torch.zeros(n, len(ids[0]), h, wd, dtype=torch.float64)
    for i in range(n):
        for j, c in enumerate(ids[i]):
            for ch in range(k):
                out[i, j] += float(w[c, ch]) * a[i, ch].double()
    return out


# --------------------------------------------------------------------------- top classes


def test_top_classes_sorted_by_probability():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    ids, values = top_classes(probs, 2)
    assert ids.tolist() == [[1, 2], [0, 2]]
    assert torch.allclose(values, torch.tensor([[0.6, 0.3], [0.5, 0.3]]))


def test_top_classes_clamps_to_available_classes():
    probs = torch.tensor([[0.2, 0.8]])
    ids, _ = top_classes(probs, 10)
    assert ids.tolist() == [[1, 0]]


def test_top_classes_rejects_zero():
    with pytest.raises(ValueError, match="must be >= 1"):
        top_classes(torch.tensor([[0.5, 0.5]]), 0)


# --------------------------------------------------------------------------- normalisation


def test_normalize_cams_by_hand():
    cams = torch.tensor([[[[2.0, -1.0], [4.0, 1.0]]]])  # 1×1×2×2, max 4
    out = normalize_cams(cams)
    expected = torch.tensor([[[[0.5, 0.0], [1.0, 0.25]]]])
    assert out.shape == (1, 1, 2, 2)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "values",
    [
        [[-1.0, -2.0], [-0.5, -3.0]],  # max < 0
        [[0.0, -2.0], [-0.5, -3.0]],  # max == 0
        [[0.0, 0.0], [0.0, 0.0]],  # all zero
    ],
)
def test_normalize_cams_non_positive_max_gives_zeros(values):
    out = normalize_cams(torch.tensor([[values]]))
    assert torch.equal(out, torch.zeros(1, 1, 2, 2))


def test_normalize_cams_each_map_by_its_own_max():
    cams = torch.tensor(
        [
            [[[1.0, 2.0]], [[10.0, -5.0]]],
            [[[-1.0, -1.0]], [[3.0, 6.0]]],
        ]
    )  # 2×2×1×2
    out = normalize_cams(cams)
    expected = torch.tensor(
        [
            [[[0.5, 1.0]], [[1.0, 0.0]]],
            [[[0.0, 0.0]], [[0.5, 1.0]]],
        ]
    )
    assert torch.allclose(out, expected)
    assert not torch.equal(cams, out)  # the input is not modified in place
    assert cams[0, 1, 0, 1] == -5.0


# --------------------------------------------------------------------------- compute_cams


def test_compute_cams_per_image_classes_equal_explicit_loops():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, 5, generator=gen)
    w = torch.randn(6, 3, generator=gen)
    ids = [[5, 0, 3], [2, 2, 4]]
    out = compute_cams(a, w, torch.tensor(ids))
    assert out.shape == (2, 3, 4, 5)
    assert torch.allclose(out.double(), _loop_cams(a, w, ids), atol=1e-5)


def test_compute_cams_shared_class_ids_apply_to_every_image():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, 2, 3, generator=gen)
    w = torch.randn(7, 4, generator=gen)
    shared = compute_cams(a, w, torch.tensor([6, 1]))
    assert shared.shape == (3, 2, 2, 3)
    assert torch.allclose(shared.double(), _loop_cams(a, w, [[6, 1]] * 3), atol=1e-5)
    per_image = compute_cams(a, w, torch.tensor([[6, 1]] * 3))
    assert torch.allclose(shared, per_image, atol=1e-6)


def test_compute_cams_uses_no_bias_and_hand_values():
    # A: two channels of a 1×2 grid; W rows: class 0 = (1, 2), class 1 = (-1, 0).
    a = torch.tensor([[[[1.0, 0.0]], [[3.0, -1.0]]]])
    w = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    out = compute_cams(a, w, torch.tensor([[0, 1]]))
    assert out.tolist() == [[[[7.0, -2.0]], [[-1.0, 0.0]]]]


def test_compute_cams_validates_shapes():
    a = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="input channels"):
        compute_cams(a, torch.zeros(5, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="3 rows for a batch of 2"):
        compute_cams(a, torch.zeros(5, 3), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="N×K×h×w"):
        compute_cams(torch.zeros(3, 4, 4), torch.zeros(5, 3), torch.tensor([0]))


def test_class_activation_maps_normalised_and_resized():
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(1, 3, 2, 3, generator=gen)
    w = torch.rand(4, 3, generator=gen)
    out = class_activation_maps(a, w, torch.tensor([[3, 1]]), size=(4, 6))
    raw = _loop_cams(a, w, [[3, 1]]).float()
    up = F.interpolate(raw, size=(4, 6), mode="bilinear", align_corners=False)
    expected = up / up.amax(dim=(2, 3), keepdim=True)
    assert out.shape == (1, 2, 4, 6)
    assert torch.allclose(out, expected, atol=1e-6)
    # Same grid: no resampling, just normalisation.
    same = class_activation_maps(a, w, torch.tensor([3, 1]), size=(2, 3))
    assert torch.allclose(same, raw / raw.amax(dim=(2, 3), keepdim=True), atol=1e-6)


# --------------------------------------------------------------------------- boxes


def _two_blobs() -> np.ndarray:
    """8×10 heatmap: a big blob (12 cells, 0.25 with one 1.0 peak) and a small one (4 cells)."""
    heat = np.zeros((8, 10), dtype=np.float32)
    heat[1:4, 1:5] = 0.25  # big blob: rows 1-3, cols 1-4
    heat[2, 2] = 1.0  # its peak
    heat[5:7, 7:9] = 0.5  # small blob: rows 5-6, cols 7-8
    return heat


@pytest.mark.parametrize(
    ("threshold", "box"),
    [
        (0.01, (1, 1, 5, 4)),  # both blobs; the big one (12 cells) wins
        (0.20, (1, 1, 5, 4)),
        (0.25, (1, 1, 5, 4)),  # >= threshold: 0.25 cells still count
        (0.30, (7, 5, 9, 7)),  # big blob reduced to its peak (1 cell); small blob has 4
        (0.50, (7, 5, 9, 7)),
        (0.60, (2, 2, 3, 3)),  # only the peak is left
        (1.00, (2, 2, 3, 3)),
    ],
)
def test_heatmap_boxes_two_blobs(threshold, box):
    out = heatmap_boxes(_two_blobs(), thresholds=(threshold,))
    assert out.shape == (1, 4)
    assert out.dtype == np.float32
    assert tuple(out[0].tolist()) == box


def test_heatmap_boxes_all_thresholds_at_once_and_scale_invariance():
    expected = np.array([[1, 1, 5, 4], [1, 1, 5, 4], [7, 5, 9, 7], [2, 2, 3, 3]], dtype=np.float32)
    out = heatmap_boxes(_two_blobs(), thresholds=(0.01, 0.2, 0.3, 0.6))
    np.testing.assert_array_equal(out, expected)
    # Thresholds are fractions of the maximum: scaling the map changes nothing.
    np.testing.assert_array_equal(heatmap_boxes(7.0 * _two_blobs(), (0.01, 0.2, 0.3, 0.6)), out)


def test_heatmap_boxes_default_thresholds():
    assert BOX_THRESHOLDS == (0.01, 0.10, 0.20, 0.30, 0.40)
    out = heatmap_boxes(_two_blobs())
    expected = [[1, 1, 5, 4], [1, 1, 5, 4], [1, 1, 5, 4], [7, 5, 9, 7], [7, 5, 9, 7]]
    assert out.tolist() == expected


def test_heatmap_boxes_min_cells_gives_nan_rows():
    out = heatmap_boxes(_two_blobs(), thresholds=(0.01, 0.3, 0.6), min_cells=5)
    assert out[0].tolist() == [1, 1, 5, 4]  # 4×3 = 12 cells
    assert np.isnan(out[1]).all()  # 2×2 = 4 cells < 5
    assert np.isnan(out[2]).all()  # 1 cell


def test_heatmap_boxes_zero_threshold_uses_positive_cells():
    heat = np.zeros((3, 4), dtype=np.float32)
    heat[0, 0] = 1.0
    heat[2, 1:4] = 0.001
    out = heatmap_boxes(heat, thresholds=(0.0,))
    assert out.tolist() == [[1, 2, 4, 3]]  # the 3-cell row beats the single peak cell


def test_heatmap_boxes_non_positive_map_gives_nans():
    out = heatmap_boxes(np.zeros((4, 4)), thresholds=(0.1, 0.2))
    assert out.shape == (2, 4)
    assert np.isnan(out).all()
    assert np.isnan(heatmap_boxes(-np.ones((2, 2)), thresholds=(0.1,))).all()


def test_heatmap_boxes_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        heatmap_boxes(np.zeros((1, 4, 4)))


def test_largest_component_is_8_connected():
    mask = np.array(
        [
            [1, 0, 0, 0],
            [0, 1, 0, 1],
            [0, 0, 1, 1],
        ],
        dtype=bool,
    )
    # The diagonal chain (0,0)-(1,1)-(2,2) joins (2,3) and (1,3): one component of 5 cells.
    assert largest_component_box(mask) == (0, 0, 4, 3)


def test_largest_component_ties_pick_first_in_raster_order():
    mask = np.zeros((4, 6), dtype=bool)
    mask[3, 4:6] = True  # 2 cells, later in raster order
    mask[0, 0:2] = True  # 2 cells, first
    assert largest_component_box(mask) == (0, 0, 2, 1)
    assert largest_component_box(np.zeros((2, 2), dtype=bool)) is None


# --------------------------------------------------------------------------- coordinates


def test_boxes_to_pixels_by_hand():
    # Grid h=2, w=4 on a 400×100 image: cells are 100 px wide and 50 px high.
    boxes = np.array([[1, 0, 3, 2], [0, 1, 1, 2], [np.nan] * 4], dtype=np.float32)
    out = boxes_to_pixels(boxes, grid=(2, 4), image_size=(400, 100))
    np.testing.assert_array_equal(out[:2], [[100, 0, 300, 100], [0, 50, 100, 100]])
    assert np.isnan(out[2]).all()
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    ("box", "cells"),
    [
        ((15, 5, 35, 25), (1, 0, 4, 3)),  # partial cells are included
        ((10, 10, 30, 20), (1, 1, 3, 2)),  # aligned to cell borders
        ((12, 12, 12, 12), (1, 1, 2, 2)),  # degenerate box: still one cell
        ((-5, -5, 100, 100), (0, 0, 8, 4)),  # clipped to the grid
        ((80, 40, 80, 40), (7, 3, 8, 4)),  # on the far corner: the last cell
        ((0, 0, 80, 40), (0, 0, 8, 4)),  # the whole image
    ],
)
def test_pixels_to_cells_by_hand(box, cells):
    # Grid h=4, w=8 on an 80×40 image: every cell is 10×10 px.
    assert pixels_to_cells(box, grid=(4, 8), image_size=(80, 40)) == cells


def test_pixels_to_cells_non_square_cells():
    # Grid h=3, w=2 on a 100×90 image: cells are 50 px wide, 30 px high.
    assert pixels_to_cells((49, 31, 51, 59), grid=(3, 2), image_size=(100, 90)) == (0, 1, 2, 2)


def test_mean_cam_is_the_mean_of_the_normalised_cams_on_the_feature_grid():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 6, 4, 6, generator=gen)
    a = torch.randn(1, 5, 2, 3, generator=gen)
    weight = torch.randn(7, 5, generator=gen)
    heat = mean_cam(x, a, weight, [4, 1])
    cams = compute_cams(a, weight, torch.tensor([4, 1]))
    cams = normalize_cams(F.interpolate(cams, size=(4, 6), mode="bilinear", align_corners=False))
    assert heat.shape == (4, 6)
    np.testing.assert_allclose(heat, cams[0].mean(0).numpy(), rtol=1e-6)
