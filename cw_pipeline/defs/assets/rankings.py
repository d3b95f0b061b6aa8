"""``<ev>/rankings``: one ranking table per method of an evaluation."""

import dagster as dg
import pyarrow as pa

from cw_pipeline.compute.data_versions import table_version
from cw_pipeline.compute.pca import pca_output_dims
from cw_pipeline.compute.published import current_index, database_table, publish_rankings
from cw_pipeline.compute.rankings import evaluation_input_problems, evaluation_rankings
from cw_pipeline.config import EvaluationConfig, ProjectConfig
from cw_pipeline.defs.assets.pca import pca_key
from cw_pipeline.defs.assets.support import start_step
from cw_pipeline.defs.automation import (
    DerivedParent,
    refresh_when_derived_parents_usable,
    refresh_when_inputs_change,
)
from cw_pipeline.defs.checks import inputs_inconsistent, rankings_check_specs, rankings_checks
from cw_pipeline.defs.dependencies import Dep
from cw_pipeline.defs.partitions import ident
from cw_pipeline.defs.resources import PipelineResource

#: Rankings metadata on what was reused: kept maps (``maps_reused``, ``maps_written``,
#: ``maps_over_budget``), region scores and OnA descriptors of (query, image) pairs.
REUSE_STATISTICS = (
    "maps_reused",
    "maps_written",
    "maps_over_budget",
    "region_scores_computed",
    "region_scores_reused",
    "ona_descriptors_computed",
    "ona_descriptors_reused",
)


def ranked(stats: dict) -> pa.Table:
    """The database the rankings ranked, from :func:`evaluation_rankings`' statistics."""
    ids, parts, start = stats["database_ids"], [], 0
    for name, count in stats["database_parts"]:
        parts.append((name, ids[start : start + count]))
        start += count
    return database_table(parts)


def rankings_key(ev: EvaluationConfig) -> dg.AssetKey:
    return dg.AssetKey([ev.name, "rankings"])


def rankings_asset(
    config: ProjectConfig,
    ev: EvaluationConfig,
    deps: list[Dep],
    distractors: list[DerivedParent] | None = None,
) -> dg.AssetsDefinition:
    """Rankings of every method over the dataset and its distractors. ``deps``: descriptors,
    PCA, query features and distractor descriptors; refreshed as soon as they change. With
    distractors (``distractors``: each set's descriptors, their input condition and their
    ``reproject_at_once`` condition), a small set's out-of-date shards are projected by the
    rankings themselves, in the same run as a new PCA; a large set holds the rankings back
    until its descriptors are re-projected at its cron. The blocking ``inputs_consistent``
    check fails the run before anything is written when the inputs are not one state."""
    ds = config.dataset(ev.dataset)
    key, methods = rankings_key(ev), [m.name for m in ev.methods]
    condition = (
        refresh_when_derived_parents_usable(deps, distractors, shared=[pca_key(ds)])
        if distractors
        else refresh_when_inputs_change(deps)
    )
    against = f" and {', '.join(ev.distractors)}" if ev.distractors else ""
    waits = (
        f" Refreshed when its inputs change: at once while the distractor set holds at most "
        f"{ev.reproject_at_once:,} images (reproject_at_once; the rankings project its "
        "out-of-date shards themselves), else once its descriptors are re-projected at the "
        "evaluation's cron."
        if distractors
        else " Refreshed when its inputs change."
    )

    @dg.asset(
        key=key,
        deps=[d.key for d in deps],
        # In a run that ranks several evaluations of one dataset, the one without distractors
        # goes first: the pairs it computes are then reused by those with distractors.
        op_tags={"dagster/priority": "0" if ev.distractors else "1"},
        group_name=ident(ev.name),
        kinds={"parquet"},
        automation_condition=condition,
        description=f"{ev.name} rankings: {ds.name}'s queries ranked over {ds.name}{against} "
        f"by {', '.join(methods)}. OnA and re-ranking read the kept feature maps and the "
        f"kept scores of (query, image) pairs: a refresh computes only new pairs.{waits}",
        check_specs=rankings_check_specs(key),
    )
    def rankings(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        step = start_step(context, pipeline, deps, derived=distractors or ())
        store, shards = step.store, step.evaluation_shards(config, ev.name)
        index = current_index(store, ds)  # read once: checked and ranked as one state
        problems = evaluation_input_problems(config, store, ev, shards, index)
        if problems:
            raise inputs_inconsistent(ev, problems)
        needs_maps = any(m.needs_maps for m in ev.methods)
        extractor = pipeline.extractor(ds) if needs_maps else None
        tables, stats = evaluation_rankings(config, store, ev, shards, extractor, index)
        assert index is not None  # else a problem above
        # Every method's table becomes visible to the report (and figures) at once.
        commit = publish_rankings(
            store,
            ev.name,
            tables,
            ranked(stats),
            meta={"index": index.generation, "pca_output_dims": pca_output_dims(store, ds, index)},
        )
        return dg.MaterializeResult(
            data_version=dg.DataVersion(table_version(tables)),
            tags=step.tags,
            metadata={
                "cpu_seconds": step.cpu_seconds(),
                "methods": methods,
                "database_images": stats["database"],
                "queries": stats["queries"],
                "seconds_per_method": stats["seconds"],
                "map_forward_passes": stats["map_forward_passes"],
                "distractors_projected": stats.get("distractors_projected", 0),
                "generation": commit.generation,
                **{k: stats[k] for k in REUSE_STATISTICS if k in stats},
            },
            check_results=rankings_checks(config, store, ev, shards, tables, stats["database"]),
        )

    return rankings
