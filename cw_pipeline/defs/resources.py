"""Dagster resources: the project configuration, the feature store and the CNN."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import dagster as dg

from cw_pipeline.config import (
    ConfigError,
    DatasetConfig,
    ProjectConfig,
    default_config_path,
    load_config,
)
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor, valid_device
from cw_pipeline.runtime.recovery import tag_run_worker
from cw_pipeline.store import FeatureStore


def _config(path: str) -> ProjectConfig:
    """The project configuration, re-read when the file changes."""
    source = Path(path) if path else default_config_path()
    try:
        st = source.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None  # load_config reports the missing file
    return _load(str(source), stamp)


@functools.lru_cache(maxsize=8)
def _load(path: str, stamp: tuple[int, int] | None) -> ProjectConfig:
    del stamp  # part of the cache key only
    return load_config(Path(path))


@functools.lru_cache(maxsize=4)
def _extractor(
    config: ExtractionConfig,
    batch_size: int,
    batch_pixels: int,
    batch_target_pixels: int | None,
    device: str,
    threads: int | None,
) -> FeatureExtractor:
    """One network per extraction settings (datasets with equal settings share it)."""
    return FeatureExtractor(
        config,
        device=device,
        num_threads=threads,
        batch_size=batch_size,
        batch_pixels=batch_pixels,
        batch_target_pixels=batch_target_pixels,
    )


#: Torch device for this process's forward passes, overriding the datasets' ``device`` (e.g.
#: ``cuda`` on GPU workers only, while other steps of the same run stay on CPUs).
DEVICE_ENV = "CW_PIPELINE_DEVICE"


def _env_device() -> str | None:
    value = os.environ.get(DEVICE_ENV, "").strip()
    if not value:
        return None
    try:
        valid_device(value)
    except ValueError as exc:
        raise ConfigError(str(exc), source=f"${DEVICE_ENV}") from None
    return value


class PipelineResource(dg.ConfigurableResource):
    """Where the project's configuration lives, and overrides for this deployment.

    Attributes:
        config_path: the datasets YAML file ("" = ``$CW_PIPELINE_CONFIG`` or
            ``data/datasets.yaml``).
        warehouse: feature-store root or URL overriding the YAML's ``warehouse``.
        device: torch device for forward passes ("" = ``$CW_PIPELINE_DEVICE`` of the process
            running the step, else each dataset's ``device``).
        num_threads: torch CPU threads (0 = each dataset's setting / torch default).
    """

    config_path: str = ""
    warehouse: str = ""
    device: str = ""
    num_threads: int = 0

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # A run launched by the daemon records its run worker's process, so that a later
        # command or sensor tick can tell when it died (cw_pipeline.runtime.recovery).
        if context.instance is not None and context.dagster_run is not None:
            tag_run_worker(context.instance, context.dagster_run)

    def project(self) -> ProjectConfig:
        return _config(self.config_path)

    def store(self) -> FeatureStore:
        """The feature store; in an asset's step, its I/O errors name the asset (and
        partition) besides the file."""
        return FeatureStore(self.warehouse or self.project().warehouse).writing_for(_writer())

    def reports_dir(self) -> str:
        return self.project().reports

    def extractor(self, ds: DatasetConfig) -> FeatureExtractor:
        # Built from ``ds`` itself, not from the file: the caller's settings are the ones that
        # its code version (stored with the features) describes.
        r = ds.runtime
        threads = self.num_threads or r.num_threads
        device = self.device or _env_device() or r.device
        return _extractor(
            ds.extraction, r.batch_size, r.batch_pixels, r.batch_target_pixels, device, threads
        )


def _writer() -> str | None:
    """``asset <key> [<partition>]`` of the step running now (None outside a step)."""
    try:
        context = dg.OpExecutionContext.get()
    except Exception:  # no step is running
        return None
    if context is None:
        return None
    try:
        keys = sorted(k.to_user_string() for k in context.selected_asset_keys)
    except Exception:  # an op without assets
        return None
    what = f"asset {', '.join(keys)}" if keys else f"op {context.op.name}"
    if context.has_partition_key:
        what += f" [{context.partition_key}]"
    return what
