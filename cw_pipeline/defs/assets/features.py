"""``<ds>/cam_features``: the CAM features of each shard (one forward pass per new image)."""

import logging
import time

import dagster as dg
import pyarrow as pa

from cw_pipeline.compute.checkpoints import ShardCheckpoints
from cw_pipeline.compute.data_versions import manifest_version, version_of
from cw_pipeline.compute.feature_maps import maps_wanted_at_indexing, warehouse_maps
from cw_pipeline.compute.features import feature_code_version, progress_logger, update_features
from cw_pipeline.config import DatasetConfig
from cw_pipeline.defs.assets.manifest import manifest_key
from cw_pipeline.defs.assets.support import (
    cpu_seconds,
    forward_usage_metadata,
    read_optional,
    start_step,
)
from cw_pipeline.defs.checks import features_check_specs, features_checks
from cw_pipeline.defs.executors import cnn_op_tags
from cw_pipeline.defs.partitions import ident, partitions_def
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.store import FEATURES, features_path, manifest_path, rejected_path

#: The pool of the forward-pass steps (``dagster.yaml``'s ``pools.default_limit`` bounds it).
CNN_POOL = "cnn"
#: Images between two progress log lines inside runs.
PROGRESS_EVERY = 50


def features_key(ds: DatasetConfig) -> dg.AssetKey:
    return dg.AssetKey([ds.name, "cam_features"])


def _reusable(previous: pa.Table | None, code_version: str, log: logging.Logger) -> pa.Table | None:
    """The stored rows when computed with ``code_version`` (read from the rows just read, not
    from a second read: another run may have replaced the file since), else None."""
    if previous is None:
        return None
    stored = (previous.schema.metadata or {}).get(b"code_version", b"").decode("utf-8", "replace")
    if stored != code_version:
        log.info("stored features are from %s: recomputing", stored)
        return None
    return previous


def features_asset(ds: DatasetConfig) -> dg.AssetsDefinition:
    """Partitioned by shard, pool ``cnn``: rows are reused by sha1 (stored shard, then the
    checkpoints of a killed run), so only new or changed images get a forward pass."""
    key, code_version = features_key(ds), feature_code_version(ds)
    e = ds.extraction

    @dg.asset(
        key=key,
        deps=[manifest_key(ds)],
        partitions_def=partitions_def(ds.name),
        group_name=ident(ds.name),
        kinds={"pytorch", "parquet"},
        pool=CNN_POOL,
        op_tags=cnn_op_tags(),  # executor hints (Dask resources, Kubernetes GPU); see executors
        code_version=code_version,
        description=f"{ds.name} CAM features per shard: top-N_C classes, class vectors, "
        f"sum-pooled vector, CAM boxes ({e.backbone}, resize {e.resize}, "
        f"N_C={e.stored_classes} stored).",
        check_specs=features_check_specs(key),
    )
    def cam_features(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        step = start_step(context, pipeline)
        store, shard = step.store, step.shard
        manifest_table = store.read_table(manifest_path(ds.name, shard))
        rel = features_path(ds.name, shard)
        previous = _reusable(read_optional(store, rel, context.log), code_version, context.log)
        # Every batch is checkpointed; a run killed mid-shard resumes from its checkpoints.
        checkpoints = ShardCheckpoints(store, FEATURES, ds.name, shard, code_version)
        extractor = pipeline.extractor(ds)
        # Maps an evaluation will read are kept now: those images get no second forward pass.
        project = pipeline.project()
        maps = warehouse_maps(project, store, ds) if maps_wanted_at_indexing(project, ds) else None
        cpu0 = time.process_time()  # the forward passes' CPU, not the network's loading
        usage0 = extractor.stats.forward_usage()
        update = update_features(
            ds,
            manifest_table,
            previous,
            extractor,
            progress_logger(context.log, f"{ds.name}/{shard}", every_images=PROGRESS_EVERY),
            resumed=checkpoints.load(context.log),
            checkpoint=checkpoints.write,
            maps=maps,
        )
        store.write_table(rel, update.table, metadata={"code_version": code_version})
        store.write_table(rejected_path(ds.name, shard), update.rejected)
        checkpoints.clear()
        # Features are a function of the manifest's (id, sha1) pairs and the code version.
        version = version_of({"manifest": manifest_version(manifest_table), "code": code_version})
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={
                "rows": update.table.num_rows,
                "forward_passes": update.forward_passes,
                "reused": update.reused,
                "resumed": update.resumed,
                "rejected": update.rejected.num_rows,
                "seconds": round(update.seconds, 3),
                "cpu_seconds": cpu_seconds(cpu0),
                "images_per_second": round(update.images_per_second, 2),
                **forward_usage_metadata(extractor, usage0, update.forward_passes),
                **({} if maps is None else maps.statistics()),
                "path": store.url(rel),
            },
            check_results=features_checks(update, ds, extractor),
        )

    return cam_features
