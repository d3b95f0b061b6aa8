"""The asset graph of a project: :func:`build_definitions` (``cw_pipeline/definitions.py``
calls it on the configured YAML for Dagster; the CLI and the tests on theirs)."""

from __future__ import annotations

import dagster as dg

from cw_pipeline.config import DatasetConfig, ProjectConfig
from cw_pipeline.defs.assets import dataset_assets, evaluation_assets
from cw_pipeline.defs.executors import executor_from_env
from cw_pipeline.defs.jobs import index_job
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.defs.schedules import dataset_schedule
from cw_pipeline.defs.sensors import automation_sensor, dataset_sensor

__all__ = ["build_definitions"]


def _dataset_defs(
    config: ProjectConfig, ds: DatasetConfig, pipeline: PipelineResource
) -> dg.Definitions:
    """A dataset's assets and checks, its indexing job, folder sensor and daily schedule."""
    job = index_job(ds)
    return dg.Definitions(
        assets=dataset_assets(config, ds, pipeline.store),
        jobs=[job],
        sensors=[dataset_sensor(ds, job)],
        schedules=[dataset_schedule(ds, job)],
    )


def build_definitions(config: ProjectConfig, warehouse: str = "") -> dg.Definitions:
    """The code location of a project configuration (``warehouse``: overrides its store)."""
    pipeline = PipelineResource(config_path=str(config.source), warehouse=warehouse)
    datasets = [_dataset_defs(config, ds, pipeline) for ds in config.datasets.values()]
    evaluations = [
        a
        for ev in config.evaluations.values()
        for a in evaluation_assets(config, ev, pipeline.store)
    ]
    return dg.Definitions.merge(
        *datasets,
        dg.Definitions(
            assets=evaluations,
            sensors=[automation_sensor()],
            executor=executor_from_env(),
            resources={"pipeline": pipeline},
        ),
    )
