"""What the asset factories share: the opening of every asset's step (:func:`start_step`),
CPU time, optional reads (wiring only)."""

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dagster as dg
import pyarrow as pa

from cw_pipeline.config import ProjectConfig
from cw_pipeline.core import allocator
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.defs.automation import DerivedParent, input_version_when_current
from cw_pipeline.defs.dependencies import INPUT_VERSION_TAG, Dep, input_version
from cw_pipeline.defs.partitions import current_shards
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.store import CorruptFileError, FeatureStore

__all__ = [
    "AssetStep",
    "StoreFactory",
    "cpu_seconds",
    "forward_usage_metadata",
    "read_optional",
    "start_step",
]

#: Gives the feature store outside a run (automation conditions read it at evaluation time).
StoreFactory = Callable[[], FeatureStore]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssetStep:
    """What an asset's step starts from (:func:`start_step`)."""

    instance: dg.DagsterInstance
    store: FeatureStore  #: the feature store (its I/O errors name the asset)
    partition: str | None  #: the shard being materialized (None: an unpartitioned asset)
    input_version: str  #: of the asset's inputs, read before them ("missing": one is missing)
    tags: dict[str, str]  #: the materialization's tags recording ``input_version`` ({}: none)
    cpu_start: float  #: ``time.process_time()`` when the step started

    @property
    def shard(self) -> str:
        """The shard being materialized (an asset partitioned by shard)."""
        if self.partition is None:
            raise ValueError("an unpartitioned asset has no shard")
        return self.partition

    def cpu_seconds(self) -> float:
        """CPU seconds of this process since the step started (:func:`cpu_seconds`)."""
        return cpu_seconds(self.cpu_start)

    def shards(self, dataset: str) -> list[str]:
        """The current shards of ``dataset``."""
        return current_shards(self.instance, dataset)

    def evaluation_shards(self, config: ProjectConfig, evaluation: str) -> dict[str, list[str]]:
        """The current shards of an evaluation's dataset and of each of its distractor sets."""
        ev = config.evaluation(evaluation)
        return {name: self.shards(name) for name in (ev.dataset, *ev.distractors)}


def start_step(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,
    deps: Sequence[Dep] = (),
    derived: Sequence[DerivedParent] = (),
) -> AssetStep:
    """The opening of an asset's step: its CPU clock, its partition, the input version of
    ``deps`` read *before* its inputs (and the tags recording it; none without ``deps``) and
    the feature store. ``derived`` parents count as they are once current
    (:func:`input_version_when_current`, as the asset's automation condition counts them)."""
    cpu0 = time.process_time()
    instance = context.instance
    partition = context.partition_key if context.has_partition_key else None
    version, tags = "missing", {}
    if deps:
        if derived:
            version = input_version_when_current(instance, deps, derived) or "missing"
        else:
            version = input_version(instance, deps, partition) or "missing"
        tags = {INPUT_VERSION_TAG: version}
    return AssetStep(instance, pipeline.store(), partition, version, tags, cpu0)


def cpu_seconds(start: float) -> float:
    """CPU seconds of this process (all its threads) since ``start`` (``time.process_time``)."""
    return round(time.process_time() - start, 3)


def forward_usage_metadata(
    extractor: FeatureExtractor, before: tuple[float, float, int], images: int
) -> dict[str, object]:
    """The malloc setting of this process and what its forward passes since ``before``
    (``extractor.stats.forward_usage()``) cost the kernel: system CPU share, page faults."""
    user, system, faults = (
        now - then for now, then in zip(extractor.stats.forward_usage(), before, strict=True)
    )
    meta: dict[str, object] = {"malloc": allocator.state().mode}
    if images:
        meta["forward_page_faults_per_image"] = round(faults / images, 1)
        meta["forward_system_cpu_share"] = round(system / max(user + system, 1e-9), 4)
    return meta


def read_optional(
    store: FeatureStore, rel: str, log: logging.Logger | None = None
) -> pa.Table | None:
    """A stored table, or None when absent or corrupt (a corrupt file is rebuilt)."""
    if not store.exists(rel):
        return None
    try:
        return store.read_table(rel)
    except CorruptFileError as exc:
        (log or logger).warning("%s: rebuilding it", exc)
        return None
