"""Dagster definitions: asset factories, resources, sensors and schedules (wiring only)."""

from __future__ import annotations

import dagster as dg

from cw_pipeline.config import ProjectConfig
from cw_pipeline.defs.assets import dataset_assets, evaluation_assets
from cw_pipeline.defs.automation import (
    automation_sensor,
    dataset_schedule,
    dataset_sensor,
    index_job,
)
from cw_pipeline.defs.executors import executor_from_env
from cw_pipeline.defs.resources import PipelineResource


def build_definitions(config: ProjectConfig, warehouse: str = "") -> dg.Definitions:
    """The code location for a project configuration."""
    assets, jobs, sensors, schedules = [], [], [], []
    pipeline = PipelineResource(config_path=str(config.source), warehouse=warehouse)
    for ds in config.datasets.values():
        assets += dataset_assets(config, ds, pipeline.store)
        job = index_job(ds)
        jobs.append(job)
        sensors.append(dataset_sensor(ds, job))
        schedules.append(dataset_schedule(ds, job))
    for ev in config.evaluations.values():
        assets += evaluation_assets(config, ev)
    sensors.append(automation_sensor())
    return dg.Definitions(
        assets=assets,
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        executor=executor_from_env(),
        resources={"pipeline": pipeline},
    )
