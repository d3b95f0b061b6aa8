"""Asset factories: one module, one short factory per asset (wiring only; the computations
are in :mod:`cw_pipeline.compute` over the store's named paths).

Per dataset ``<ds>`` (group ``<ds>``), partitioned by shard: ``manifest``
(:mod:`.manifest`), ``cam_features`` (:mod:`.features`); per dataset with ground truth,
unpartitioned: ``query_features`` (box queries, :mod:`.queries`), ``pca_model`` (fitted on
the paired dataset, :mod:`.pca`), ``descriptors`` (:mod:`.descriptors`).

Per evaluation ``<ev>`` (group ``<ev>``): ``<d>_descriptors`` per distractor set ``d``
(:mod:`.distractors`), ``rankings`` (:mod:`.rankings`) and ``map_report`` (:mod:`.map_report`).
Every asset's description starts with the dataset or evaluation it belongs to.
"""

import dagster as dg

from cw_pipeline.config import DatasetConfig, EvaluationConfig, ProjectConfig
from cw_pipeline.config.models import DEFAULT_EVALUATION_CRON
from cw_pipeline.defs.assets.descriptors import descriptors_asset, descriptors_key
from cw_pipeline.defs.assets.distractors import (
    distractor_descriptors_asset,
    distractor_descriptors_deps,
    distractor_descriptors_key,
    distractors_at_once,
)
from cw_pipeline.defs.assets.features import CNN_POOL, features_asset, features_key
from cw_pipeline.defs.assets.manifest import manifest_asset, manifest_key
from cw_pipeline.defs.assets.map_report import map_report_asset
from cw_pipeline.defs.assets.pca import pca_asset, pca_key
from cw_pipeline.defs.assets.queries import query_features_asset, query_features_key
from cw_pipeline.defs.assets.rankings import rankings_asset
from cw_pipeline.defs.assets.support import StoreFactory
from cw_pipeline.defs.automation import DerivedParent, InputsChanged
from cw_pipeline.defs.checks import shards_readable_check
from cw_pipeline.defs.dependencies import Dep
from cw_pipeline.defs.partitions import partitions_def
from cw_pipeline.store import FeatureStore

__all__ = ["CNN_POOL", "dataset_assets", "evaluation_assets"]


def dataset_assets(
    config: ProjectConfig, ds: DatasetConfig, store_factory: StoreFactory | None = None
) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    """A dataset's assets and its ``shards_readable`` checks. ``store_factory`` gives the
    feature store to the automation condition of ``query_features`` (default: the
    configuration's warehouse)."""
    store_factory = store_factory or (lambda: FeatureStore(config.warehouse))
    out: list[dg.AssetsDefinition | dg.AssetChecksDefinition] = [
        manifest_asset(ds),
        features_asset(ds),
        shards_readable_check(ds, manifest_key(ds)),
        shards_readable_check(ds, features_key(ds)),
    ]
    if not ds.has_groundtruth:
        return out
    if not ds.grouped:  # grouped datasets' queries are database images
        out.append(query_features_asset(ds, store_factory))
    return [*out, pca_asset(config, ds), descriptors_asset(config, ds)]


def evaluation_assets(
    config: ProjectConfig, ev: EvaluationConfig, store_factory: StoreFactory | None = None
) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    """An evaluation's distractor descriptors, rankings and report. ``store_factory`` gives
    the feature store to the distractor descriptors' automation condition (default: the
    configuration's warehouse)."""
    store_factory = store_factory or (lambda: FeatureStore(config.warehouse))
    ds = config.dataset(ev.dataset)
    deps = [Dep(descriptors_key(ds)), Dep(pca_key(ds))]
    if not ds.grouped:
        deps.append(Dep(query_features_key(ds)))
    cron = ev.schedule or DEFAULT_EVALUATION_CRON
    out: list[dg.AssetsDefinition | dg.AssetChecksDefinition] = []
    parents = []
    for dname in ev.distractors:
        at_once = distractors_at_once(ev, dname, store_factory)
        out.append(distractor_descriptors_asset(config, ev, dname, cron, at_once))
        dep = Dep(distractor_descriptors_key(ev, dname), partitions_def(dname))
        deps.append(dep)
        node = InputsChanged(distractor_descriptors_deps(config, ev, dname))
        parents.append(DerivedParent(dep, node, at_once))
    return [*out, rankings_asset(config, ev, deps, parents), map_report_asset(config, ev)]
