"""Tests for cw_pipeline.core.feature_set: per-image records stacked column-wise."""

from __future__ import annotations

import numpy as np
import pytest

from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline_tests.core.random_features import N_C, K, random_classifier, random_records

# --------------------------------------------------------------------------- FeatureSet


def test_feature_set_from_records_subset(scene):
    _, _, database, _ = scene
    assert len(database) == 10
    assert database.class_ids.shape == (10, N_C)
    assert database.class_vectors.shape == (10, N_C, K)
    assert database.sum_pooled.shape == (10, K)
    assert database.boxes.shape == (10, 5, 4)
    assert database.maps is not None and len(database.maps) == 10
    sub = database.subset([3, 1])
    assert sub.ids == ["db3", "db1"]
    np.testing.assert_array_equal(sub.class_vectors[0], database.class_vectors[3])
    assert sub.maps[1] is database.maps[1]


def test_feature_set_from_records_errors():
    recs = random_records(2, seed=3, classifier=random_classifier())
    with pytest.raises(ValueError, match="1 ids for 2 records"):
        FeatureSet.from_records(["a"], recs)
    with pytest.raises(ValueError, match="empty"):
        FeatureSet.from_records([], [])
