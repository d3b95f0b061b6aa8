"""Search the materialized index of a configured dataset with a query image (no Dagster).

The query goes through the dataset's own extraction settings (backbone, layer, weights,
resize policy, N_C) and, with a box, its query protocol (``crop``: the box is cut out before the
forward pass; ``paper``: the feature maps are cropped). Its descriptor is aggregated with the
PCA the dataset's descriptors were built with (the ``pca_model`` asset; a self-split dataset's
two halves are searched each with its own PCA and the lists merged by score), and ranked with
:func:`cw_pipeline.core.retrieval.search`, the function the rankings asset and ``evaluate``
use: cosine ranking, then CAM-box re-ranking of the top R and query expansion with the top K.

Where the database descriptors come from:

* a dataset with ground truth: its ``descriptors`` asset;
* a folder dataset that is the distractor set of an evaluation: that evaluation's distractor
  descriptors (with the PCA of the evaluation's dataset; the first such evaluation by name);
* any other folder dataset: raw sum-pooling from its stored features (``--method raw`` only).

The package: :mod:`~cw_pipeline.query.common` (errors, results, the loaded database, the query
image and box), :mod:`~cw_pipeline.query.loading` (the database of a dataset or evaluation) and
:mod:`~cw_pipeline.query.ranking` (the search).
"""

from __future__ import annotations

from cw_pipeline.query.common import (
    BrokenIndexError,
    Hit,
    InconsistentIndexError,
    NotIndexedError,
    QueryError,
    QueryResult,
    SearchIndex,
    check_box,
    load_query_image,
)
from cw_pipeline.query.loading import index_problem, load_evaluation_index, load_index
from cw_pipeline.query.ranking import format_results, search_dataset, search_image

__all__ = [
    "BrokenIndexError",
    "Hit",
    "InconsistentIndexError",
    "NotIndexedError",
    "QueryError",
    "QueryResult",
    "SearchIndex",
    "check_box",
    "format_results",
    "index_problem",
    "load_evaluation_index",
    "load_index",
    "load_query_image",
    "search_dataset",
    "search_image",
]
