"""``<ev>/rankings``: one ranking table per method of an evaluation."""

import time

import dagster as dg

from cw_pipeline.compute.data_versions import table_version
from cw_pipeline.compute.rankings import evaluation_input_problems, evaluation_rankings
from cw_pipeline.config import EvaluationConfig, ProjectConfig
from cw_pipeline.defs.assets.support import cpu_seconds, evaluation_shards, versioned
from cw_pipeline.defs.checks import inputs_inconsistent, rankings_check_specs, rankings_checks
from cw_pipeline.defs.partitions import ident
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.defs.versions import Dep, on_cron_when_inputs_change, refresh_when_inputs_change
from cw_pipeline.store import rankings_path


def rankings_key(ev: EvaluationConfig) -> dg.AssetKey:
    return dg.AssetKey([ev.name, "rankings"])


def rankings_asset(
    config: ProjectConfig, ev: EvaluationConfig, deps: list[Dep], cron: str
) -> dg.AssetsDefinition:
    """Rankings of every method over the dataset and its distractors. ``deps``: descriptors,
    PCA, query features and distractor descriptors; with distractors (100k images) the
    rankings wait for the evaluation's ``cron``. The blocking ``inputs_consistent`` check
    fails the run before anything is written when the inputs are not one state."""
    ds = config.dataset(ev.dataset)
    key, methods = rankings_key(ev), [m.name for m in ev.methods]
    condition = (
        on_cron_when_inputs_change(cron, deps)
        if ev.distractors
        else refresh_when_inputs_change(deps)
    )
    against = f" and {', '.join(ev.distractors)}" if ev.distractors else ""

    @dg.asset(
        key=key,
        deps=[d.key for d in deps],
        group_name=ident(ev.name),
        kinds={"parquet"},
        automation_condition=condition,
        description=f"{ev.name} rankings: {ds.name}'s queries ranked over {ds.name}{against} "
        f"by {', '.join(methods)}.",
        check_specs=rankings_check_specs(key),
    )
    def rankings(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        cpu0 = time.process_time()
        _, tags = versioned(context, deps)
        store = pipeline.store()
        shards = evaluation_shards(config, context.instance, ev.name)
        problems = evaluation_input_problems(config, store, ev, shards)
        if problems:
            raise inputs_inconsistent(ev, problems)
        needs_maps = any(m.needs_maps for m in ev.methods)
        extractor = pipeline.extractor(ds) if needs_maps else None
        tables, stats = evaluation_rankings(config, store, ev, shards, extractor)
        for name, table in tables.items():
            store.write_table(rankings_path(ev.name, name), table)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(table_version(tables)),
            tags=tags,
            metadata={
                "cpu_seconds": cpu_seconds(cpu0),
                "methods": methods,
                "database_images": stats["database"],
                "queries": stats["queries"],
                "seconds_per_method": stats["seconds"],
                "map_forward_passes": stats["map_forward_passes"],
            },
            check_results=rankings_checks(config, store, ev, shards, tables, stats["database"]),
        )

    return rankings
