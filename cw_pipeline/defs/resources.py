"""Dagster resources: the project configuration, the feature store and the CNN."""

from __future__ import annotations

import functools
from pathlib import Path

import dagster as dg

from cw_pipeline.config import DatasetConfig, ProjectConfig, load_config
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.indexing import extraction_config
from cw_pipeline.store import FeatureStore


@functools.lru_cache(maxsize=8)
def _config(path: str) -> ProjectConfig:
    return load_config(Path(path) if path else None)


@functools.lru_cache(maxsize=4)
def _extractor(
    code_version: str, ds_key: tuple, device: str, threads: int | None
) -> FeatureExtractor:
    del code_version  # part of the cache key only
    config_path, name = ds_key
    ds = _config(config_path).dataset(name)
    return FeatureExtractor(
        extraction_config(ds),
        device=device,
        num_threads=threads,
        batch_size=ds.extraction.batch_size,
    )


class PipelineResource(dg.ConfigurableResource):
    """Where the project's configuration lives, and overrides for this deployment.

    Attributes:
        config_path: the datasets YAML file ("" = ``$CW_PIPELINE_CONFIG`` or
            ``data/datasets.yaml``).
        warehouse: feature-store root or URL overriding the YAML's ``warehouse``.
        device: torch device for forward passes ("" = each dataset's ``device``).
        num_threads: torch CPU threads (0 = each dataset's setting / torch default).
    """

    config_path: str = ""
    warehouse: str = ""
    device: str = ""
    num_threads: int = 0

    def project(self) -> ProjectConfig:
        return _config(self.config_path)

    def store(self) -> FeatureStore:
        return FeatureStore(self.warehouse or self.project().warehouse)

    def reports_dir(self) -> str:
        return self.project().reports

    def extractor(self, ds: DatasetConfig) -> FeatureExtractor:
        code_version = extraction_config(ds).code_version()
        threads = self.num_threads or ds.extraction.num_threads
        device = self.device or ds.extraction.device
        return _extractor(code_version, (self.config_path, ds.name), device, threads)
