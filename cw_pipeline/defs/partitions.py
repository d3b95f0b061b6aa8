"""Dataset shards as Dagster dynamic partitions, and the names derived from dataset names."""

from __future__ import annotations

import dagster as dg

__all__ = ["current_shards", "ident", "partitions_def"]


def ident(name: str) -> str:
    """A Dagster-safe identifier for a dataset or evaluation name (groups, jobs, sensors)."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def partitions_def(ds_name: str) -> dg.DynamicPartitionsDefinition:
    """The dynamic partitions of a dataset: one per shard (``<ds>_shards``)."""
    return dg.DynamicPartitionsDefinition(name=f"{ident(ds_name)}_shards")


def current_shards(instance: dg.DagsterInstance, ds_name: str) -> list[str]:
    """The dataset's shards the instance knows now, sorted."""
    return sorted(instance.get_dynamic_partitions(partitions_def(ds_name).name))
