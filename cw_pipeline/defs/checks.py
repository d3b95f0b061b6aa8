"""The asset checks of the pipeline (wiring only).

Most checks are evaluated by the asset they check, from the data it has in hand (no second
read): each has a spec builder (``*_check_specs``, given to the asset) and a result builder
here. ``shards_readable`` is a check of its own (:func:`shards_readable_check`): executed
alone it reads every stored shard of a dataset.

* ``<ds>/manifest``: ``ids_unique_and_readable``, ``shards_readable``;
* ``<ds>/cam_features``: ``features_finite_and_shaped``, ``no_rejected_images`` (warn),
  ``shards_readable``;
* ``<ev>/rankings``: ``covers_every_query`` and the blocking ``inputs_consistent`` (a mixed
  state of the inputs fails the run before anything is written: :func:`inputs_inconsistent`);
* ``<ev>/map_report`` of the demo evaluations: ``map_above_floor``.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import pyarrow as pa

from cw_pipeline.compute import reports
from cw_pipeline.compute.features import (
    ShardUpdate,
    load_features,
    stored_class_shape,
    stored_finite,
)
from cw_pipeline.config import DatasetConfig, EvaluationConfig, ProjectConfig
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.defs.partitions import current_shards
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.store import CorruptFileError, FeatureStore, query_features_path

__all__ = [
    "COVERS_EVERY_QUERY",
    "FEATURES_FINITE_AND_SHAPED",
    "IDS_UNIQUE_AND_READABLE",
    "INPUTS_CONSISTENT",
    "MAP_ABOVE_FLOOR",
    "NO_REJECTED_IMAGES",
    "SHARDS_READABLE",
    "features_check_specs",
    "features_checks",
    "inputs_inconsistent",
    "manifest_check_specs",
    "manifest_checks",
    "rankings_check_specs",
    "rankings_checks",
    "report_check_specs",
    "report_checks",
    "shards_readable_check",
]

IDS_UNIQUE_AND_READABLE = "ids_unique_and_readable"
FEATURES_FINITE_AND_SHAPED = "features_finite_and_shaped"
NO_REJECTED_IMAGES = "no_rejected_images"
SHARDS_READABLE = "shards_readable"
COVERS_EVERY_QUERY = "covers_every_query"
#: Blocking check of ``<ev>/rankings``: its inputs describe one state of the images.
INPUTS_CONSISTENT = "inputs_consistent"
MAP_ABOVE_FLOOR = "map_above_floor"


# --------------------------------------------------------------------------- manifest


def manifest_check_specs(key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    """The checks ``<ds>/manifest`` evaluates itself."""
    return [
        dg.AssetCheckSpec(
            IDS_UNIQUE_AND_READABLE,
            asset=key,
            description="Image ids are unique (error) and every file could be read (warn).",
        )
    ]


def manifest_checks(ids: Sequence[str], errors: Sequence[str]) -> list[dg.AssetCheckResult]:
    """Results of :func:`manifest_check_specs` for a shard's ids and its unreadable files."""
    unique = len(set(ids)) == len(ids)
    return [
        dg.AssetCheckResult(
            check_name=IDS_UNIQUE_AND_READABLE,
            passed=unique and not errors,
            severity=dg.AssetCheckSeverity.ERROR if not unique else dg.AssetCheckSeverity.WARN,
            metadata={
                "duplicate_ids": len(ids) - len(set(ids)),
                "unreadable": len(errors),
                "first_error": errors[0] if errors else "",
            },
        )
    ]


# --------------------------------------------------------------------------- features


def features_check_specs(key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    """The checks ``<ds>/cam_features`` evaluates itself."""
    return [
        dg.AssetCheckSpec(
            FEATURES_FINITE_AND_SHAPED,
            asset=key,
            description="Every stored value is finite; class vectors are N_C × channels.",
        ),
        dg.AssetCheckSpec(
            NO_REJECTED_IMAGES,
            asset=key,
            description="No image of the shard was rejected as unreadable (warn).",
        ),
    ]


def features_checks(
    update: ShardUpdate, ds: DatasetConfig, extractor: FeatureExtractor
) -> list[dg.AssetCheckResult]:
    """Results of :func:`features_check_specs` for a shard's features just computed."""
    table = update.table
    if table.num_rows == 0:
        finite = shaped = True
    else:
        expected = (ds.extraction.stored_classes, extractor.backbone.feature_dim)
        finite, shaped = stored_finite(table), stored_class_shape(table) == expected
    rejected = update.rejected.num_rows
    return [
        dg.AssetCheckResult(
            check_name=FEATURES_FINITE_AND_SHAPED,
            passed=finite and shaped,
            metadata={"finite": finite, "shaped": shaped},
        ),
        dg.AssetCheckResult(
            check_name=NO_REJECTED_IMAGES,
            passed=rejected == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "rejected": rejected,
                "reasons": "\n".join(f"{i}: {r}" for i, r in update.errors[:20]),
            },
        ),
    ]


def shards_readable_check(ds: DatasetConfig, key: dg.AssetKey) -> dg.AssetChecksDefinition:
    """Check ``shards_readable`` of a partitioned table asset (``<ds>/manifest`` or
    ``<ds>/cam_features``): its Parquet shards decode, page checksums included.

    In a run of one shard (every materialization) it reads that shard; run on its own (the
    UI's "Execute" on the check, or a job selecting it) it reads every shard of the dataset.
    A truncated or damaged file fails it (ERROR) with the file named; re-materializing the
    shard rebuilds it (a corrupt stored shard is not reused). Shards not materialized yet are
    counted, not failed.
    """
    kind = key.path[-1]

    @dg.asset_check(
        asset=key,
        name=SHARDS_READABLE,
        description=f"Every stored {kind} shard of {ds.name} is a complete Parquet file.",
    )
    def shards_readable(context: dg.AssetCheckExecutionContext, pipeline: PipelineResource):
        store = pipeline.store()
        shard = context.run.tags.get("dagster/partition")
        shards = [shard] if shard else current_shards(context.instance, ds.name)
        corrupt: list[CorruptFileError] = []
        missing = 0
        for s in shards:
            try:
                store.read_table(FeatureStore.shard_path(kind, ds.name, s))
            except FileNotFoundError:
                missing += 1
            except CorruptFileError as exc:
                context.log.error("%s: re-materialize shard %r to rebuild it", exc, s)
                corrupt.append(exc)
        return dg.AssetCheckResult(
            passed=not corrupt,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(str(e) for e in corrupt) or None,
            metadata={
                "checked": len(shards) - missing,
                "not_materialized": missing,
                "corrupt": len(corrupt),
                "corrupt_files": "\n".join(e.location for e in corrupt),
            },
        )

    return shards_readable


# --------------------------------------------------------------------------- rankings


def rankings_check_specs(key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    """The checks ``<ev>/rankings`` evaluates itself (``inputs_consistent`` blocking)."""
    return [
        dg.AssetCheckSpec(
            COVERS_EVERY_QUERY,
            asset=key,
            description="Every method's rankings hold exactly the evaluation's queries.",
        ),
        dg.AssetCheckSpec(
            INPUTS_CONSISTENT,
            asset=key,
            blocking=True,
            description="Descriptors, distractor descriptors, query features and ground "
            "truth describe one state of the images (the current manifests); a mixed state "
            "fails the run before anything is written, and stops the chain.",
        ),
    ]


def inputs_inconsistent(ev: EvaluationConfig, problems: Sequence[str]) -> dg.Failure:
    """The failure of a rankings run whose inputs are not one state of the images."""
    return dg.Failure(
        description=f"{ev.name}: inputs of the rankings are inconsistent: " + "; ".join(problems),
        metadata={INPUTS_CONSISTENT: False, "problems": "\n".join(problems)},
    )


def _expected_queries(
    config: ProjectConfig, store: FeatureStore, ev: EvaluationConfig, shards: Mapping
) -> set[str]:
    ds = config.dataset(ev.dataset)
    if ds.grouped:
        return set(load_features(store, ds.name, shards[ds.name]).ids)
    rel = query_features_path(ds.name)
    return set(store.read_table(rel, ["image_id"]).column("image_id").to_pylist())


def rankings_checks(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    shards: Mapping[str, list[str]],
    tables: Mapping[str, pa.Table],
    database_images: int,
) -> list[dg.AssetCheckResult]:
    """Results of :func:`rankings_check_specs` for the rankings just computed."""
    expected = _expected_queries(config, store, ev, shards)
    covered = all(set(t.column("query_id").to_pylist()) == expected for t in tables.values())
    return [
        dg.AssetCheckResult(
            check_name=COVERS_EVERY_QUERY,
            passed=covered,
            metadata={"expected_queries": len(expected)},
        ),
        dg.AssetCheckResult(
            check_name=INPUTS_CONSISTENT,
            passed=True,
            metadata={
                "database_images": database_images,
                "shards": sum(len(v) for v in shards.values()),
            },
        ),
    ]


# --------------------------------------------------------------------------- reports


def report_check_specs(ev: EvaluationConfig, key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    """``map_above_floor`` for evaluations with a floor (:data:`reports.MAP_FLOORS`)."""
    floor = reports.MAP_FLOORS.get(ev.name)
    if floor is None:
        return []
    return [
        dg.AssetCheckSpec(
            MAP_ABOVE_FLOOR,
            asset=key,
            description=f"The OfA mAP of {ev.name} (else the best method's) is at least {floor}.",
        )
    ]


def report_checks(ev: EvaluationConfig, report: Mapping[str, Any]) -> list[dg.AssetCheckResult]:
    """Results of :func:`report_check_specs` for a report just built."""
    floor = reports.MAP_FLOORS.get(ev.name)
    if floor is None:
        return []
    results = report["results"]
    best = results[0]["map"] if results else 0.0
    primary = next((r for r in results if r["method"] == "ofa"), None)
    value = primary["map"] if primary else best
    return [
        dg.AssetCheckResult(
            check_name=MAP_ABOVE_FLOOR,
            passed=bool(value >= floor),
            metadata={"ofa_map": value, "floor": floor},
        )
    ]
