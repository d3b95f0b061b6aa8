"""``<ev>/map_report``: mAP per method and per query, with its figures."""

import json

import dagster as dg

from cw_pipeline.compute import report_figures, reports
from cw_pipeline.compute.data_versions import version_of
from cw_pipeline.config import EvaluationConfig, ProjectConfig
from cw_pipeline.defs.assets.rankings import rankings_key
from cw_pipeline.defs.assets.support import start_step
from cw_pipeline.defs.automation import refresh_when_inputs_change
from cw_pipeline.defs.checks import report_check_specs, report_checks
from cw_pipeline.defs.dependencies import Dep
from cw_pipeline.defs.partitions import ident
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.store import REPORT_MARKDOWN, FeatureStore, report_path


def map_report_key(ev: EvaluationConfig) -> dg.AssetKey:
    return dg.AssetKey([ev.name, "map_report"])


def map_report_asset(config: ProjectConfig, ev: EvaluationConfig) -> dg.AssetsDefinition:
    """Scores the stored rankings, writes ``<reports>/<ev>/`` (report, figures) and shows the
    markdown in the UI; ``map_above_floor`` for the demo evaluations."""
    ds = config.dataset(ev.dataset)
    key, deps = map_report_key(ev), [Dep(rankings_key(ev))]

    @dg.asset(
        key=key,
        deps=[rankings_key(ev)],
        group_name=ident(ev.name),
        kinds={"markdown"},
        automation_condition=refresh_when_inputs_change(deps),
        description=f"{ev.name} mAP report: mAP per method and per query beside the paper's "
        "numbers, precision-recall curves and results sheets.",
        check_specs=report_check_specs(ev, key),
    )
    def map_report(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        step = start_step(context, pipeline, deps)
        store, shards = step.store, step.evaluation_shards(config, ev.name)
        reports_store = FeatureStore(pipeline.reports_dir())
        report, figs, _ = report_figures.report_with_figures(
            config, store, ev, shards, reports_store.root, pipeline.extractor(ds)
        )
        meta = {
            "cpu_seconds": step.cpu_seconds(),
            "report": dg.MetadataValue.md(reports.markdown(report, figs.embedded)),
            "path": dg.MetadataValue.path(reports_store.url(report_path(ev.name, REPORT_MARKDOWN))),
            "figures": dg.MetadataValue.path(str(figs.folder)),
            **figs.as_metadata(),
        }
        for r in report["results"]:
            meta[f"map/{r['method']}"] = round(r["map"], 4)
        version = version_of(json.dumps(report["results"], sort_keys=True, default=str))
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            tags=step.tags,
            metadata=meta,
            check_results=report_checks(ev, report),
        )

    return map_report
