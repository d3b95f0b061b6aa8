"""``<ev>/<d>_descriptors``: a distractor set's descriptors under one evaluation's PCA."""

import dagster as dg

from cw_pipeline.compute.descriptors import descriptor_sets, descriptor_table, offline_aggregations
from cw_pipeline.compute.features import load_features, stored_image_count
from cw_pipeline.compute.pca import pca_models_for, pca_version
from cw_pipeline.config import EvaluationConfig, ProjectConfig
from cw_pipeline.defs.assets.features import features_key
from cw_pipeline.defs.assets.pca import pca_key
from cw_pipeline.defs.assets.support import StoreFactory, start_step
from cw_pipeline.defs.automation import AtOnce, at_once_or_on_cron
from cw_pipeline.defs.dependencies import Dep
from cw_pipeline.defs.partitions import ident, partitions_def
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.store import distractor_descriptors_path, features_path


def distractor_descriptors_key(ev: EvaluationConfig, dname: str) -> dg.AssetKey:
    return dg.AssetKey([ev.name, f"{dname}_descriptors"])


def distractor_descriptors_deps(
    config: ProjectConfig, ev: EvaluationConfig, dname: str
) -> list[Dep]:
    """The inputs of ``<ev>/<dname>_descriptors``: the shard's features and the PCA."""
    ds, dset = config.dataset(ev.dataset), config.dataset(dname)
    return [
        Dep(features_key(dset), partitions_def(dname), same_partition=True),
        Dep(pca_key(ds)),
    ]


def distractors_at_once(ev: EvaluationConfig, dname: str, store_factory: StoreFactory) -> AtOnce:
    """Holds while distractor set ``dname`` has at most ``reproject_at_once`` images: its
    descriptors are re-projected as soon as their inputs change, and the evaluation's rankings
    project its out-of-date shards themselves
    (:func:`cw_pipeline.compute.rankings.projects_distractors`, the same measure)."""
    return AtOnce(
        lambda: stored_image_count(store_factory(), dname),
        ev.reproject_at_once,
        f"the number of images of {dname} (reproject_at_once)",
    )


def distractor_descriptors_asset(
    config: ProjectConfig,
    ev: EvaluationConfig,
    dname: str,
    cron: str,
    at_once: AtOnce,
) -> dg.AssetsDefinition:
    """Partitioned like the distractor set ``dname``; a shard without images drops its
    descriptors. Re-projected as soon as its inputs change while ``at_once`` holds (the set
    holds at most ``reproject_at_once`` images: seconds of work), else after the evaluation's
    cron tick."""
    ds, dset = config.dataset(ev.dataset), config.dataset(dname)
    deps = distractor_descriptors_deps(config, ev, dname)

    @dg.asset(
        key=distractor_descriptors_key(ev, dname),
        deps=[features_key(dset), pca_key(ds)],
        partitions_def=partitions_def(dname),
        group_name=ident(ev.name),
        kinds={"parquet"},
        automation_condition=at_once_or_on_cron(cron, deps, at_once),
        description=f"{ev.name} distractor descriptors: raw, raw+PCA and OfA descriptors of "
        f"{dname}, per shard, with {ds.name}'s PCA. Refreshed when a shard's features or the "
        f"PCA change: at once while {dname} holds at most {ev.reproject_at_once:,} images "
        f"(reproject_at_once), else after the evaluation's cron ({cron}).",
    )
    def distractor_descriptors(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        step = start_step(context, pipeline, deps)
        store, shard = step.store, step.shard
        images = store.read_table(features_path(dname, shard), ["image_id"]).num_rows
        if images == 0:
            for agg in offline_aggregations():  # drop descriptors of removed images
                store.delete(distractor_descriptors_path(ev.name, dname, agg, shard))
        elif ds.self_split:  # refused by the configuration already
            raise ValueError(f"{ev.name}: distractors with a self-split dataset are not supported")
        else:
            feats = load_features(store, dname, [shard])
            pcas = pca_models_for(store, ds)
            desc = descriptor_sets(feats, pcas, config.search)
            meta = {"pca": pca_version(pcas)}  # checked against the dataset's before ranking
            for agg, mat in desc.items():
                rel = distractor_descriptors_path(ev.name, dname, agg, shard)
                store.write_table(rel, descriptor_table(feats.ids, mat), metadata=meta)
        # A deterministic function of this shard's features and the PCA: its input version.
        return dg.MaterializeResult(
            data_version=dg.DataVersion(step.input_version),
            tags=step.tags,
            metadata={"images": images, "cpu_seconds": step.cpu_seconds()},
        )

    return distractor_descriptors
