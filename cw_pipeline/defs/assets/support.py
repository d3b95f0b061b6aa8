"""What the asset factories share: input versions, CPU time, optional reads (wiring only)."""

import logging
import time
from collections.abc import Callable, Sequence

import dagster as dg
import pyarrow as pa

from cw_pipeline.config import ProjectConfig
from cw_pipeline.core import allocator
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.defs.automation import DerivedParent, input_version_when_current
from cw_pipeline.defs.dependencies import INPUT_VERSION_TAG, Dep, input_version
from cw_pipeline.defs.partitions import current_shards
from cw_pipeline.store import CorruptFileError, FeatureStore

__all__ = [
    "StoreFactory",
    "cpu_seconds",
    "evaluation_shards",
    "forward_usage_metadata",
    "read_optional",
    "versioned",
]

#: Gives the feature store outside a run (automation conditions read it at evaluation time).
StoreFactory = Callable[[], FeatureStore]

logger = logging.getLogger(__name__)


def versioned(
    context: dg.AssetExecutionContext,
    deps: list[Dep],
    partition: str | None = None,
    derived: Sequence[DerivedParent] = (),
) -> tuple[str, dict[str, str]]:
    """The input version of a run (read *before* its inputs) and the tags recording it;
    ``derived`` parents count as they are once current (:func:`input_version_when_current`,
    as the asset's automation condition counts them)."""
    instance = context.instance
    if derived:
        version = input_version_when_current(instance, deps, derived) or "missing"
    else:
        version = input_version(instance, deps, partition) or "missing"
    return version, {INPUT_VERSION_TAG: version}


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


def evaluation_shards(
    config: ProjectConfig, instance: dg.DagsterInstance, evaluation: str
) -> dict[str, list[str]]:
    """The current shards of an evaluation's dataset and of each of its distractor sets."""
    ev = config.evaluation(evaluation)
    return {name: current_shards(instance, name) for name in (ev.dataset, *ev.distractors)}
