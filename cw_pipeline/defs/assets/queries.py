"""``<ds>/query_features``: the features of a box-query dataset's queries."""

import time

import dagster as dg
import pyarrow as pa

from cw_pipeline.compute.features import feature_code_version
from cw_pipeline.compute.queries import compute_query_features, query_input_version
from cw_pipeline.config import DatasetConfig
from cw_pipeline.defs.assets.manifest import manifest_key
from cw_pipeline.defs.assets.support import StoreFactory, start_step
from cw_pipeline.defs.automation import refresh_when_inputs_change
from cw_pipeline.defs.dependencies import INPUT_VERSION_TAG, Dep
from cw_pipeline.defs.partitions import current_shards, ident, partitions_def
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.store import manifest_path, query_features_path


def query_features_key(ds: DatasetConfig) -> dg.AssetKey:
    return dg.AssetKey([ds.name, "query_features"])


def query_features_asset(ds: DatasetConfig, store_factory: StoreFactory) -> dg.AssetsDefinition:
    """Unpartitioned; refreshed only when the ground truth, a query image or the extraction
    settings change (:func:`query_input_version`, read from the store that
    ``store_factory`` gives), not when other images do."""
    code_version = feature_code_version(ds)

    def query_version(instance: dg.DagsterInstance) -> str | None:
        shards = current_shards(instance, ds.name)
        return query_input_version(store_factory(), ds, shards, code_version)

    @dg.asset(
        key=query_features_key(ds),
        deps=[manifest_key(ds)],
        group_name=ident(ds.name),
        kinds={"pytorch", "parquet"},
        code_version=f"{code_version}-{ds.query_protocol}",
        automation_condition=refresh_when_inputs_change(
            [Dep(manifest_key(ds), partitions_def(ds.name))], version_fn=query_version
        ),
        description=f"{ds.name} query features: the features of the queries of its ground "
        f"truth ({ds.query_protocol} protocol).",
    )
    def query_features(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        step = start_step(context, pipeline)
        store, shards = step.store, step.shards(ds.name)
        version = query_input_version(store, ds, shards, code_version) or "missing"
        manifest = pa.concat_tables([store.read_table(manifest_path(ds.name, s)) for s in shards])
        t0 = time.perf_counter()
        table = compute_query_features(ds, manifest, pipeline.extractor(ds))
        store.write_table(query_features_path(ds.name), table)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            tags={INPUT_VERSION_TAG: version},
            metadata={
                "queries": table.num_rows,
                "seconds": round(time.perf_counter() - t0, 2),
                "cpu_seconds": step.cpu_seconds(),
            },
        )

    return query_features
