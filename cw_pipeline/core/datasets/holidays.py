"""INRIA Holidays ground truth: six-digit names, the first four the group, ``xxxx00`` its
query."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from cw_pipeline.core.datasets.model import GroundTruth, Query, basename_stem, check_unique_ids

_HOLIDAYS_RE = re.compile(r"(\d{4})(\d{2})")


def _group_and_suffix(image_id: str) -> tuple[str, str]:
    """(group, suffix) of a Holidays id: ``123401`` → (``1234``, ``01``)."""
    m = _HOLIDAYS_RE.fullmatch(basename_stem(image_id))
    if m is None:
        raise ValueError(f"not an INRIA Holidays image id (six digits, e.g. 123400): {image_id!r}")
    return m.group(1), m.group(2)


def holidays_labels(image_ids: Sequence[str]) -> np.ndarray:
    """Object label (the group, its first four digits) of each Holidays id."""
    return np.array([int(_group_and_suffix(str(i))[0]) for i in image_ids], dtype=np.int64)


def holidays_groundtruth(image_ids: Sequence[str]) -> GroundTruth:
    """INRIA Holidays (``123400.jpg``): group = first four digits, query = ``xxxx00``.

    Positives are the other images of the group; the query image itself is junk (it stays in
    the database but is ignored in its own ranking). Every group needs its ``xxxx00`` image.
    """
    ids = check_unique_ids(list(image_ids), "holidays image_ids")
    groups: dict[str, list[tuple[str, str]]] = {}
    for image_id in ids:
        group, suffix = _group_and_suffix(image_id)
        groups.setdefault(group, []).append((suffix, image_id))
    queries = []
    for group in sorted(groups):
        members = groups[group]
        query_ids = [image_id for suffix, image_id in members if suffix == "00"]
        if not query_ids:
            raise ValueError(f"Holidays group {group} has no query image {group}00")
        if len(query_ids) > 1:
            raise ValueError(f"Holidays group {group} has several query images: {query_ids}")
        qid = query_ids[0]
        positives = frozenset(image_id for _, image_id in members if image_id != qid)
        queries.append(Query(qid, None, positives, frozenset({qid}), name=group))
    return GroundTruth(
        "holidays", ids, tuple(queries), revisited=False, queries_in_database=True, grouped=True
    )
