"""``<ds>/descriptors``: raw, raw+PCA and OfA descriptors of a ground-truth dataset."""

import dagster as dg

from cw_pipeline.compute.data_versions import array_version, version_of
from cw_pipeline.compute.descriptors import dataset_descriptors, descriptor_table
from cw_pipeline.compute.features import load_features
from cw_pipeline.compute.pca import pca_models_for, pca_version
from cw_pipeline.compute.published import current_pca, publish_index
from cw_pipeline.config import DatasetConfig, ProjectConfig
from cw_pipeline.defs.assets.features import features_key
from cw_pipeline.defs.assets.pca import pca_key
from cw_pipeline.defs.assets.support import start_step
from cw_pipeline.defs.automation import refresh_when_inputs_change
from cw_pipeline.defs.dependencies import Dep
from cw_pipeline.defs.partitions import ident, partitions_def
from cw_pipeline.defs.resources import PipelineResource


def descriptors_key(ds: DatasetConfig) -> dg.AssetKey:
    return dg.AssetKey([ds.name, "descriptors"])


def descriptors_asset(config: ProjectConfig, ds: DatasetConfig) -> dg.AssetsDefinition:
    """One table per offline aggregation (self-split: each half with its own PCA)."""
    deps = [Dep(features_key(ds), partitions_def(ds.name)), Dep(pca_key(ds))]

    @dg.asset(
        key=descriptors_key(ds),
        deps=[features_key(ds), pca_key(ds)],
        group_name=ident(ds.name),
        kinds={"parquet"},
        automation_condition=refresh_when_inputs_change(deps),
        description=f"{ds.name} descriptors: raw, raw+PCA and OfA, one per image, with "
        f"{ds.name}'s PCA.",
    )
    def descriptors(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        step = start_step(context, pipeline, deps)
        store, shards = step.store, step.shards(ds.name)
        feats = load_features(store, ds.name, shards, ds.images)
        pca = current_pca(store, ds)  # read once: every table is projected with it
        if pca is None:
            raise FileNotFoundError(f"dataset {ds.name!r} has no PCA model in the feature store")
        dims, versions, tables = {}, {}, {}
        # The PCA the distractor descriptors must share (a self-split dataset has none).
        meta = None if ds.self_split else {"pca": pca_version(pca_models_for(store, ds, None, pca))}
        for agg, (ids, mat) in dataset_descriptors(config, store, ds, feats, pca).items():
            tables[agg] = descriptor_table(ids, mat)
            dims[agg] = int(mat.shape[1])
            versions[agg] = array_version({agg: mat}, ids)
        # The tables and their PCA become visible to readers together.
        commit = publish_index(store, ds, tables, pca, metadata=meta)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version_of(versions)),
            tags=step.tags,
            metadata={
                "images": len(feats),
                "dims": dims,
                "cpu_seconds": step.cpu_seconds(),
                "generation": commit.generation,
            },
        )

    return descriptors
