"""UKBench ground truth: groups of four consecutive images (``ukbench00000``…) of one object;
every image queries the whole set."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from cw_pipeline.core.datasets.model import GroundTruth, Query, basename_stem, check_unique_ids

_UKBENCH_RE = re.compile(r"ukbench(\d+)")


def ukbench_labels(image_ids: Sequence[str]) -> np.ndarray:
    """Object label (``number // 4``) of each UKBench id (``ukbench00123``, maybe ``jpg/…``)."""
    labels = np.empty(len(image_ids), dtype=np.int64)
    for i, image_id in enumerate(image_ids):
        m = _UKBENCH_RE.fullmatch(basename_stem(str(image_id)))
        if m is None:
            raise ValueError(f"not a UKBench image id (ukbenchNNNNN): {image_id!r}")
        labels[i] = int(m.group(1)) // 4
    return labels


def ukbench_groundtruth(image_ids: Sequence[str]) -> GroundTruth:
    """Every image queries the whole set; positives = same object, the query included."""
    ids = check_unique_ids(list(image_ids), "ukbench image_ids")
    labels = ukbench_labels(ids)
    groups: dict[int, list[str]] = {}
    for image_id, label in zip(ids, labels.tolist(), strict=True):
        groups.setdefault(label, []).append(image_id)
    members = {label: frozenset(g) for label, g in groups.items()}
    queries = tuple(
        Query(image_id, None, members[label], frozenset(), name=image_id)
        for image_id, label in zip(ids, labels.tolist(), strict=True)
    )
    return GroundTruth(
        "ukbench", ids, queries, revisited=False, queries_in_database=True, grouped=True
    )
