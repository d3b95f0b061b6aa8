"""The validated configuration: :class:`ProjectConfig` (warehouse, reports, datasets,
evaluations, what was disabled and why), :class:`DatasetConfig`, :class:`EvaluationConfig` and
:class:`DatasetDefaults` (pydantic models), and the vocabulary they accept (shard modes,
query protocols, generators, the default methods; the layouts are core's,
:mod:`cw_pipeline.core.datasets.layouts`). Loading the YAML into them is
:mod:`cw_pipeline.config.load`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import field_validator, model_validator

from cw_pipeline.config.yaml_file import UnknownNameError
from cw_pipeline.core.datasets.layouts import (
    GROUPED_LAYOUTS,
    GT_FILE_LAYOUTS,
    GT_FOLDER_LAYOUTS,
    Layout,
)
from cw_pipeline.core.extract import ExtractionConfig, RuntimeConfig
from cw_pipeline.core.methods import Method
from cw_pipeline.core.search_settings import SearchParams
from cw_pipeline.core.validation import Settings, bounded_int

#: Environment variable naming the config file (overrides ``<project>/data/datasets.yaml``).
CONFIG_ENV = "CW_PIPELINE_CONFIG"

ShardBy = Literal["folder", "batch"]
QueryProtocol = Literal["paper", "crop"]

SHARD_BY: tuple[str, ...] = get_args(ShardBy)
QUERY_PROTOCOLS: tuple[str, ...] = get_args(QueryProtocol)
GENERATORS: tuple[str, ...] = ("demo",)

#: ``pca_from`` value: split the dataset's objects in halves, each uses the other's PCA.
SELF_SPLIT = "self-split"

DEFAULT_METHODS: tuple[str, ...] = (
    "raw",
    "raw+pca",
    "ofa",
    "ofa+qe10",
    "ofa+r100+qe10",
    "ona",
    "ona+qe10",
)

_CRON_FIELD_RE = re.compile(r"[0-9A-Za-z*/,?#-]+")
_CRON_ALIASES = frozenset({"@hourly", "@daily", "@weekly", "@monthly"})


# --------------------------------------------------------------------------------------------
# typed configuration: the YAML's entries, validated by these models
# --------------------------------------------------------------------------------------------


class DatasetDefaults(Settings):
    """The YAML's ``defaults`` block: extraction and runtime settings every dataset inherits."""

    extraction: ExtractionConfig = ExtractionConfig()
    runtime: RuntimeConfig = RuntimeConfig()


class DatasetConfig(Settings):
    """One image collection: where its files and ground truth are, and how to process it.

    In the YAML, ``extraction`` (core's :class:`ExtractionConfig`: what the stored features
    are) and ``runtime`` (:class:`RuntimeConfig`: device, threads, batch limits) are written
    as flat keys of the entry, over the ``defaults`` block.
    """

    name: str
    layout: Layout
    images: Path
    groundtruth: Path | None = None
    pca_from: str | None = None
    shard_by: ShardBy = "batch"
    shard_size: bounded_int(1) = 1000  # type: ignore[valid-type]
    query_protocol: QueryProtocol = "paper"
    extraction: ExtractionConfig = ExtractionConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    generate: Literal["demo"] | None = None
    optional: bool = False
    description: str = ""

    @model_validator(mode="before")
    @classmethod
    def _protocol_default(cls, data: Any) -> Any:
        """Revisited queries are cropped to their box by default, the others are not."""
        if isinstance(data, dict) and "query_protocol" not in data:
            return {
                **data,
                "query_protocol": "crop" if data.get("layout") == "revisited" else "paper",
            }
        return data

    @model_validator(mode="after")
    def _groundtruth(self) -> DatasetConfig:
        layout = self.layout
        if layout in GT_FOLDER_LAYOUTS | GT_FILE_LAYOUTS and self.groundtruth is None:
            what = "folder" if layout in GT_FOLDER_LAYOUTS else "gnd_*.pkl file"
            raise ValueError(f"layout {layout!r} needs 'groundtruth' (a {what})")
        if layout not in GT_FOLDER_LAYOUTS | GT_FILE_LAYOUTS and self.groundtruth is not None:
            why = (
                "it follows from the file names"
                if layout in GROUPED_LAYOUTS
                else ("a folder layout has no queries")
            )
            raise ValueError(f"layout {layout!r} takes no 'groundtruth' ({why})")
        return self

    @property
    def has_groundtruth(self) -> bool:
        """All layouts but ``folder`` define queries and positives."""
        return self.layout != "folder"

    @property
    def grouped(self) -> bool:
        """Images grouped into objects (ukbench, holidays): every image is a query of its
        object, and the dataset may learn its PCA by ``self-split``."""
        return self.layout in GROUPED_LAYOUTS

    @property
    def self_split(self) -> bool:
        """Each half of the objects is searched with PCA learned on the other half."""
        return self.pca_from == SELF_SPLIT

    @property
    def generate_root(self) -> Path | None:
        """Root to pass to :func:`cw_pipeline.core.demo.generate_demo` (``generate: demo``)."""
        return self.images.parent.parent if self.generate == "demo" else None


#: Cron of evaluations with distractors that set no ``schedule``: when distractor sets over
#: ``reproject_at_once`` images are re-projected after a change of the PCA.
DEFAULT_EVALUATION_CRON = "0 3 * * *"
#: Distractor sets of at most this many images are re-projected as soon as their evaluation's
#: PCA changes (about 2 ms an image: seconds); larger ones wait for the evaluation's cron.
DEFAULT_REPROJECT_AT_ONCE = 20_000


class FeatureMapsConfig(Settings):
    """The YAML's ``feature_maps`` block: the maps kept for OnA and re-ranking
    (:mod:`cw_pipeline.compute.feature_maps`).

    Attributes:
        budget_gb: the most the warehouse's ``feature_maps`` folder may hold (None: no bound;
            0: keep none). Maps over it are recomputed when a search needs them.
        at_indexing: the features step keeps the maps of the images it runs the network on,
            for datasets an evaluation reads maps of (no second forward pass of those).
    """

    budget_gb: float | None = 20.0
    at_indexing: bool = True

    @field_validator("budget_gb")
    @classmethod
    def _non_negative(cls, value: float | None) -> float | None:
        if value is not None and not value >= 0:
            raise ValueError(f"budget_gb must be >= 0 (or null: no bound), got {value!r}")
        return value

    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget_gb is None else int(self.budget_gb * 1e9)


class EvaluationConfig(Settings):
    """A benchmark run: a dataset with ground truth, optional distractor sets, methods.

    ``schedule`` (cron) is when large distractor sets are re-projected after a change of the
    PCA; ``reproject_at_once`` is the size (images) up to which that is done at once instead.
    """

    name: str
    dataset: str
    distractors: tuple[str, ...] = ()
    methods: tuple[Method, ...] = ()
    schedule: str | None = None
    reproject_at_once: bounded_int(0) = DEFAULT_REPROJECT_AT_ONCE  # type: ignore[valid-type]
    implicit: bool = False  #: True for the evaluation every ground-truth dataset gets
    description: str = ""

    @field_validator("dataset")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(f"dataset must be a non-empty string, got {value!r}")
        return value

    @field_validator("distractors", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        value = [] if value is None else value
        if not isinstance(value, list | tuple) or not all(isinstance(d, str) for d in value):
            raise ValueError(f"distractors must be a list of names, got {value!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"distractors lists a set twice: {list(value)}")
        return tuple(value)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None or value.strip() in _CRON_ALIASES:
            return value
        parts = value.split()
        if len(parts) == 5 and all(_CRON_FIELD_RE.fullmatch(p) for p in parts):
            return value
        raise ValueError(
            f"invalid schedule {value!r}: expected a 5-field cron string such as '0 3 * * *' "
            f"or one of {', '.join(sorted(_CRON_ALIASES))}"
        )


@dataclass(frozen=True)
class ProjectConfig:
    """The whole validated configuration. Only enabled datasets and evaluations are listed."""

    source: Path
    warehouse: str
    reports: str
    defaults: DatasetDefaults
    datasets: dict[str, DatasetConfig]
    evaluations: dict[str, EvaluationConfig]
    search: SearchParams
    methods: tuple[Method, ...]
    disabled_datasets: dict[str, str] = field(default_factory=dict)  #: name -> reason
    disabled_evaluations: dict[str, str] = field(default_factory=dict)  #: name -> reason
    warnings: tuple[str, ...] = ()
    feature_maps: FeatureMapsConfig = field(default_factory=FeatureMapsConfig)

    def _unknown(self, kind: str, name: str, known: Iterable[str], disabled: Mapping) -> None:
        if name in disabled:
            raise UnknownNameError(
                f"{kind} {name!r} is disabled: {disabled[name]}", source=self.source
            )
        raise UnknownNameError(
            f"unknown {kind} {name!r} (known: {', '.join(sorted(known)) or 'none'})",
            source=self.source,
        )

    def dataset(self, name: str) -> DatasetConfig:
        """The dataset ``name``; :class:`UnknownNameError` lists the known ones."""
        if name not in self.datasets:
            self._unknown("dataset", name, self.datasets, self.disabled_datasets)
        return self.datasets[name]

    def evaluation(self, name: str) -> EvaluationConfig:
        """The evaluation ``name``; :class:`UnknownNameError` lists the known ones."""
        if name not in self.evaluations:
            self._unknown("evaluation", name, self.evaluations, self.disabled_evaluations)
        return self.evaluations[name]

    def evaluations_for(self, dataset: str) -> tuple[EvaluationConfig, ...]:
        """Evaluations whose results depend on ``dataset`` (as the benchmark or a distractor
        set), sorted by name."""
        self.dataset(dataset)
        return tuple(
            e
            for _, e in sorted(self.evaluations.items())
            if e.dataset == dataset or dataset in e.distractors
        )

    def paired(self, dataset: str) -> DatasetConfig | None:
        """The dataset whose features train ``dataset``'s PCA (itself for ``self-split``;
        None when it has no PCA source)."""
        ds = self.dataset(dataset)
        if ds.pca_from is None:
            return None
        return ds if ds.self_split else self.dataset(ds.pca_from)
