"""Tests for cw_pipeline.core.pca_split: the images of a set by the PCA model they use."""

from __future__ import annotations

import numpy as np
import pytest

from cw_pipeline.core.pca_split import group_labels, pca_groups


def test_pca_groups_whole_set_and_self_split_halves() -> None:
    """The one self-split helper: a whole set is one group; with object labels, two halves of
    the objects, each trained on the other (half 1 = the first objects in label order)."""
    (whole,) = pca_groups(5)
    np.testing.assert_array_equal(whole.rows, np.arange(5))
    assert whole.half is None and whole.training is None and whole.training_half is None
    labels = np.array([7, 3, 3, 9, 7, 1, 9, 1])  # objects 1, 3 | 7, 9
    first, second = pca_groups(len(labels), labels)
    np.testing.assert_array_equal(first.rows, [1, 2, 5, 7])
    np.testing.assert_array_equal(second.rows, [0, 3, 4, 6])
    np.testing.assert_array_equal(first.training, second.rows)
    np.testing.assert_array_equal(second.training, first.rows)
    assert (first.half, first.training_half, second.half, second.training_half) == (1, 2, 2, 1)
    with pytest.raises(ValueError, match="3 object labels for 4 images"):
        pca_groups(4, labels[:3])
    with pytest.raises(ValueError, match="at least two objects"):
        pca_groups(2, np.array([5, 5]))


def test_group_labels_of_the_grouped_layouts() -> None:
    """UKBench: four images per object; Holidays: the first four digits of the file name."""
    ukbench = group_labels("ukbench", [f"ukbench{i:05d}" for i in (0, 3, 4, 9)])
    np.testing.assert_array_equal(ukbench, [0, 0, 1, 2])
    holidays = group_labels("holidays", ["100000", "100001", "sub/100100"])
    np.testing.assert_array_equal(holidays, [1000, 1000, 1001])
    # read as the ground truth reads them: a name that is no Holidays id is refused, named
    with pytest.raises(ValueError, match=r"not an INRIA Holidays image id.*'1234ab'"):
        group_labels("holidays", ["100000", "1234ab"])
    with pytest.raises(ValueError, match="'oxford' has no object groups"):
        group_labels("oxford", ["a"])
