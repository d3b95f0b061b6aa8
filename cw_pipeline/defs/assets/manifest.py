"""``<ds>/manifest``: the files of each shard of a dataset."""

import dagster as dg

from cw_pipeline.compute.data_versions import manifest_version
from cw_pipeline.compute.manifests import build_manifest
from cw_pipeline.compute.shards import fingerprint, scan, shard_files, shard_skipped
from cw_pipeline.config import DatasetConfig
from cw_pipeline.core.datasets import skipped_summary
from cw_pipeline.defs.assets.support import read_optional, start_step
from cw_pipeline.defs.checks import manifest_check_specs, manifest_checks
from cw_pipeline.defs.partitions import ident, partitions_def
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.store import manifest_path


def manifest_key(ds: DatasetConfig) -> dg.AssetKey:
    return dg.AssetKey([ds.name, "manifest"])


def manifest_asset(ds: DatasetConfig) -> dg.AssetsDefinition:
    """Partitioned by shard: image id, relative path, bytes, mtime, sha1, width, height (files
    whose size and mtime did not change are not hashed again)."""
    key = manifest_key(ds)

    @dg.asset(
        key=key,
        partitions_def=partitions_def(ds.name),
        group_name=ident(ds.name),
        kinds={"parquet"},
        description=f"{ds.name} manifest: per shard, each file's id, path, bytes, mtime, sha1, "
        "width and height.",
        check_specs=manifest_check_specs(key),
    )
    def manifest(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        step = start_step(context, pipeline)
        store, shard = step.store, step.shard
        found = scan(ds)
        files = shard_files(ds, found.files, store).get(shard, [])
        skipped = shard_skipped(ds, found.skipped, store, len(found.files)).get(shard, [])
        rel = manifest_path(ds.name, shard)
        table, hashed = build_manifest(ds, files, read_optional(store, rel, context.log))
        store.write_table(rel, table, metadata={"fingerprint": fingerprint(files)})
        ids = table.column("image_id").to_pylist()
        errors = [e for e in table.column("error").to_pylist() if e]
        return dg.MaterializeResult(
            metadata={
                "cpu_seconds": step.cpu_seconds(),
                "images": len(ids),
                "hashed": hashed,
                "unreadable": len(errors),
                "skipped": len(skipped),
                "skipped_files": skipped_summary(skipped) or "none",
                "path": store.url(rel),
            },
            data_version=dg.DataVersion(manifest_version(table)),
            check_results=manifest_checks(ids, errors),
        )

    return manifest
