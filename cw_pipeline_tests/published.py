"""Where the tests find the published artefacts (:mod:`cw_pipeline.store.commits`)."""

from __future__ import annotations

from cw_pipeline.compute.published import descriptors_role, rankings_role
from cw_pipeline.store import FeatureStore
from cw_pipeline.store.commits import read_commit


def rankings_rel(store: FeatureStore, evaluation: str, method: str) -> str:
    """The store path of ``method``'s published rankings of ``evaluation``."""
    commit = read_commit(store, "evaluation", evaluation, "rankings")
    assert commit is not None, f"evaluation {evaluation!r} has no published rankings"
    return commit.file(rankings_role(method))


def descriptors_rel(store: FeatureStore, dataset: str, aggregation: str) -> str:
    """The store path of ``dataset``'s published ``aggregation`` descriptors."""
    commit = read_commit(store, "dataset", dataset, "index")
    assert commit is not None, f"dataset {dataset!r} has no published index"
    return commit.file(descriptors_role(aggregation))
