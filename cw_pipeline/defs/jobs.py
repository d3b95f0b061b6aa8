"""The indexing job of each dataset, and the run requests that index its changed shards."""

from typing import TYPE_CHECKING

import dagster as dg

from cw_pipeline.compute.features import feature_code_version
from cw_pipeline.compute.shards import plan_shards
from cw_pipeline.config import DatasetConfig
from cw_pipeline.defs.assets.features import features_key
from cw_pipeline.defs.assets.manifest import manifest_key
from cw_pipeline.defs.partitions import ident
from cw_pipeline.runtime.recovery import recover_dead_runs
from cw_pipeline.runtime.run_tags import active_index_shards, index_run_tags
from cw_pipeline.store import FeatureStore

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

__all__ = ["index_job", "index_requests"]


def index_job_name(dataset: str) -> str:
    """The name of a dataset's indexing job (``index_<ds>``), also that of the CLI's indexing
    runs."""
    return f"index_{ident(dataset)}"


def index_job(ds: DatasetConfig) -> "UnresolvedAssetJobDefinition":
    """Manifest + features of one dataset, run per shard (``index_<ds>``)."""
    return dg.define_asset_job(
        name=index_job_name(ds.name),
        selection=dg.AssetSelection.assets(manifest_key(ds), features_key(ds)),
        description=f"Index new or changed shards of {ds.name}.",
    )


def _run_key(ds: DatasetConfig, shard: str, fp: str) -> str:
    """Run key of indexing a shard: changes with its files and with the extraction settings.

    A run that failed is not requested again for the same files (its run key is spent): a
    deterministic failure is not retried every tick; changing a file of the shard is a new key.
    """
    return f"{shard}:{fp}:{feature_code_version(ds)}"


def index_requests(
    ds: DatasetConfig, store: FeatureStore, instance: dg.DagsterInstance, existing: set[str]
) -> tuple[list[dg.RunRequest], list[str], list[str], list[str]]:
    """Plan from what the store holds: run requests for the shards whose files or settings
    differ from their stored manifest and features, less those being indexed right now (by
    the daemon, the UI or the CLI). Returns (requests, new shards, removed shards, busy
    shards)."""
    fps, new, todo, removed = plan_shards(ds, store, existing)
    # A shard whose indexing process was killed (a `cw-pipeline index` on this host) is not
    # "being indexed" for ever: such runs are marked failed and their slots freed first.
    recover_dead_runs(instance)
    busy = active_index_shards(instance, ds.name)
    requests = [
        dg.RunRequest(
            partition_key=s, run_key=_run_key(ds, s, fps[s]), tags=index_run_tags(ds.name, s)
        )
        for s in todo
        if s not in busy
    ]
    return requests, new, removed, sorted(set(todo) & busy)
