"""Tests for cw_pipeline.core.online_aggregation: OnA descriptors and the online index."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from cw_pipeline.core.aggregation import PCAWhitening, l2_normalize
from cw_pipeline.core.extract import FeatureMaps
from cw_pipeline.core.online_aggregation import OnlineIndex, online_descriptors
from cw_pipeline_tests.core.random_features import random_maps


def _reference_ona(m: FeatureMaps, classes, weight: torch.Tensor) -> np.ndarray:
    """OnA descriptor of one image without PCA, with explicit loops (float64)."""
    x = m.features.astype(np.float64)
    a = x if m.cam_maps is None else m.cam_maps.astype(np.float64)
    w = weight.double().numpy()
    k, h, wd = x.shape
    q = np.array([(x[ch] > 0).mean() for ch in range(k)])
    cw = np.array([math.log(q.sum() / q[ch]) if q[ch] > 0 else 0.0 for ch in range(k)])
    total = np.zeros(k)
    for c in classes:
        cam = np.zeros((h, wd))
        for ch in range(a.shape[0]):
            cam += w[c, ch] * a[ch]
        cam = np.maximum(cam / cam.max(), 0) if cam.max() > 0 else np.zeros_like(cam)
        f = np.array([cw[ch] * (x[ch] * cam).sum() for ch in range(k)])
        total += f / max(np.linalg.norm(f), 1e-12)
    return total / np.linalg.norm(total)


def test_online_descriptors_equal_explicit_reference():
    rng = np.random.default_rng(3)
    maps = random_maps(rng, [(3, 4), (3, 4), (2, 5)])
    weight = torch.from_numpy(rng.normal(size=(10, 5)).astype(np.float32))
    bias = torch.zeros(10)
    classes = np.array([7, 2, 3])
    out = online_descriptors(maps, classes, weight, bias, None)
    assert out.shape == (3, 5)
    for i, m in enumerate(maps):
        np.testing.assert_allclose(out[i], _reference_ona(m, classes, weight), atol=1e-5)


def test_online_descriptors_with_cells_crop_each_image():
    rng = np.random.default_rng(4)
    maps = random_maps(rng, [(4, 4), (4, 4)])
    weight = torch.from_numpy(rng.normal(size=(6, 5)).astype(np.float32))
    cells = [(1, 0, 3, 2), None]
    out = online_descriptors(maps, [0, 5], weight, torch.zeros(6), None, cells=cells)
    cropped = FeatureMaps(features=maps[0].features[:, 0:2, 1:3])
    np.testing.assert_allclose(out[0], _reference_ona(cropped, [0, 5], weight), atol=1e-5)
    np.testing.assert_allclose(out[1], _reference_ona(maps[1], [0, 5], weight), atol=1e-5)


@pytest.mark.parametrize("separate_a", [False, True])
@pytest.mark.parametrize("use_pca", [False, True])
def test_online_index_equals_online_descriptors(separate_a, use_pca):
    rng = np.random.default_rng(5)
    k_a = 6 if separate_a else None
    maps = random_maps(rng, [(3, 4), (2, 5), (3, 4), (3, 4), (2, 5)], k=5, k_a=k_a)
    weight = torch.from_numpy(rng.normal(size=(10, k_a or 5)).astype(np.float32))
    bias = torch.from_numpy(rng.normal(size=10).astype(np.float32))
    pca = PCAWhitening.fit(l2_normalize(rng.normal(size=(40, 5))), dims=3) if use_pca else None
    index = OnlineIndex(maps, np.arange(10), weight, bias, pca, chunk=2)
    assert index.vectors.shape == (5, 10, 3 if use_pca else 5)
    assert index.nbytes == index.vectors.nbytes
    for classes in ([7, 2, 3], [0], [9, 1, 4, 5, 6]):
        expected = online_descriptors(maps, np.array(classes), weight, bias, pca)
        np.testing.assert_allclose(index.descriptors(np.array(classes)), expected, atol=1e-5)


def test_online_index_only_knows_its_classes():
    rng = np.random.default_rng(6)
    maps = random_maps(rng, [(2, 2)])
    weight = torch.from_numpy(rng.normal(size=(4, 5)).astype(np.float32))
    index = OnlineIndex(maps, np.array([3, 1, 3]), weight, torch.zeros(4), None)
    assert index.classes.tolist() == [1, 3]
    assert index.descriptors(np.array([3])).shape == (1, 5)
    with pytest.raises(ValueError, match="class 2 is not in this online index"):
        index.descriptors(np.array([1, 2]))


def test_online_descriptors_take_read_only_class_ids_without_a_warning():
    """Class ids read from Parquet are read-only arrays: no torch UserWarning ("not writable")
    reaches the user. In a new process, as torch gives that warning once per process."""
    code = (
        "import warnings, numpy as np, torch\n"
        "from cw_pipeline.core.online_aggregation import online_descriptors\n"
        "from cw_pipeline.core.extract import FeatureMaps\n"
        "warnings.simplefilter('error')\n"
        "x = np.ones((5, 3, 4), np.float16)\n"
        "ids = np.array([1, 2]); ids.setflags(write=False)\n"
        "out = online_descriptors([FeatureMaps(features=x)], ids, torch.ones(4, 5), "
        "torch.zeros(4), None)\n"
        "assert out.shape == (1, 5)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]
