"""``datasets.yaml`` -> typed, validated project configuration (no Dagster).

:func:`load_config` reads the YAML file, expands ``~`` and ``${VAR}`` / ``${VAR:-default}``
in paths, resolves relative paths against the YAML file's folder and validates everything
at load: unknown keys anywhere, unknown layouts, protocols, backbones and layers, missing
folders and ground truth, PCA sources and distractor sets that do not fit. Every
:class:`ConfigError` names the file and the entry, e.g.::

    data/datasets.yaml: dataset 'oxford5k': unknown layout 'oxfrod' (expected one of ...)

A dataset marked ``optional: true`` whose folder is missing is *disabled* with a warning
instead (and so are the datasets that take their PCA from it and the evaluations that use
it); :attr:`ProjectConfig.disabled_datasets` says why.

PCA sources (``pca_from``): every dataset with ground truth needs one, the name of another
dataset whose features train its PCA (the paper's protocol: Oxford with PCA from Paris and
vice versa), or ``self-split`` for UKBench/Holidays, whose objects are split in two halves,
each evaluated with PCA from the other.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from cw_pipeline.core.experiment import AGGREGATIONS
from cw_pipeline.core.experiment import Method as MethodSpec

__all__ = [
    "AGGREGATIONS",
    "CONFIG_ENV",
    "DEFAULT_METHODS",
    "LAYOUTS",
    "SELF_SPLIT",
    "ConfigError",
    "DatasetConfig",
    "DatasetLocation",
    "EvaluationConfig",
    "ExtractionSettings",
    "MethodSpec",
    "ProjectConfig",
    "SearchSettings",
    "UnknownNameError",
    "dataset_location",
    "default_config_path",
    "load_config",
    "project_root",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the config file (overrides ``<project>/data/datasets.yaml``).
CONFIG_ENV = "CW_PIPELINE_CONFIG"

Layout = Literal["oxford", "paris", "gnd", "revisited", "ukbench", "holidays", "folder"]
ShardBy = Literal["folder", "batch"]
QueryProtocol = Literal["paper", "crop"]

LAYOUTS: tuple[str, ...] = get_args(Layout)
SHARD_BY: tuple[str, ...] = get_args(ShardBy)
QUERY_PROTOCOLS: tuple[str, ...] = get_args(QueryProtocol)
GENERATORS: tuple[str, ...] = ("demo",)

#: ``pca_from`` value: split the dataset's objects in halves, each uses the other's PCA.
SELF_SPLIT = "self-split"
#: Layouts whose ground truth is a folder of Oxford-style text files.
GT_FOLDER_LAYOUTS = frozenset({"oxford", "paris"})
#: Layouts whose ground truth is a ``gnd_*.pkl`` file.
GT_FILE_LAYOUTS = frozenset({"gnd", "revisited"})
#: Layouts whose ground truth follows from the file names (no ``groundtruth`` entry).
NAMED_GT_LAYOUTS = frozenset({"ukbench", "holidays"})

DEFAULT_METHODS: tuple[str, ...] = (
    "raw",
    "raw+pca",
    "ofa",
    "ofa+qe10",
    "ofa+r100+qe10",
    "ona",
    "ona+qe10",
)

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_EVAL_NAME_RE = _NAME_RE  # names become Dagster asset keys and op names
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_CRON_FIELD_RE = re.compile(r"[0-9A-Za-z*/,?#-]+")
_CRON_ALIASES = frozenset({"@hourly", "@daily", "@weekly", "@monthly"})
_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """An invalid configuration; ``str()`` names the file, the line and the entry, e.g.
    ``datasets.yaml:12: dataset 'oxford5k': unknown layout 'oxfrod' (…)``.

    Attributes ``source`` (file), ``line`` (1-based line of the offending key or entry in the
    YAML file, when known), ``entry`` (e.g. ``"dataset 'oxford5k'"``) and ``reason`` hold the
    parts.
    """

    def __init__(
        self,
        reason: str,
        *,
        source: Path | str | None = None,
        entry: str | None = None,
        line: int | None = None,
    ) -> None:
        self.source = None if source is None else str(source)
        self.entry = entry
        self.reason = reason
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source
        if where is not None and self.line is not None:
            where = f"{where}:{self.line}"
        return ": ".join(p for p in (where, self.entry, self.reason) if p)


class UnknownNameError(ConfigError, KeyError):
    """A dataset or evaluation name that the configuration does not define (a KeyError too)."""

    __str__ = ConfigError.__str__


# --------------------------------------------------------------------------------------------
# typed configuration
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ValueError(f"{name} must be {bound}, got {value}")


@dataclass(frozen=True)
class ExtractionSettings:
    """Backbone and runtime settings of feature extraction (``defaults`` + per-dataset keys).

    ``backbone``, ``layer``, ``weights``, ``resize`` and ``n_classes`` determine the stored
    features; ``batch_size``, ``batch_pixels``, ``device`` and ``num_threads`` only how they
    are computed. ``resize`` defaults to ``max:1024`` (the long side capped at the paper's
    1024, never enlarged); ``batch_pixels`` bounds the input pixels of one forward pass, and
    so the memory of indexing (an image over it alone is quarantined, naming the budget).
    """

    backbone: str = "efficientnet_lite0"
    layer: str | None = None
    weights: str | None = None
    resize: str = "max:1024"
    n_classes: int = 64
    batch_size: int = 16
    batch_pixels: int = 8 * 1024 * 1024
    device: str = "cpu"
    num_threads: int | None = None

    def __post_init__(self) -> None:
        from cw_pipeline.core.backbones import BACKBONES
        from cw_pipeline.core.images import ResizePolicy

        spec = BACKBONES.get(self.backbone)
        if spec is None:
            raise ValueError(
                f"unknown backbone {self.backbone!r} (expected one of {sorted(BACKBONES)})"
            )
        if self.layer is not None and self.layer not in spec.layers:
            raise ValueError(
                f"backbone {self.backbone!r} has no layer {self.layer!r} "
                f"(expected one of {list(spec.layers)})"
            )
        if self.weights is not None and not isinstance(self.weights, str):
            raise ValueError(f"weights must be a string or null, got {self.weights!r}")
        ResizePolicy.parse(self.resize)
        _check_int("n_classes", self.n_classes, 1, 1000)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("batch_pixels", self.batch_pixels, 1)
        if self.num_threads is not None:
            _check_int("num_threads", self.num_threads, 1)
        _check_device(self.device)

    @property
    def resolved_layer(self) -> str:
        """``layer``, or the backbone's default layer when it is None."""
        from cw_pipeline.core.backbones import BACKBONES

        return self.layer or BACKBONES[self.backbone].default_layer

    @property
    def feature_space(self) -> tuple[str, str, str | None]:
        """(backbone, layer, weights): datasets with equal values have compatible features."""
        return (self.backbone, self.resolved_layer, self.weights)


def _check_device(device: Any) -> None:
    if not isinstance(device, str):
        raise ValueError(f"device must be a string, got {device!r}")
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"invalid device {device!r} ({exc})") from None


@dataclass(frozen=True)
class SearchSettings:
    """Aggregation settings: class vectors per image fitting PCA, PCA dims, N_C aggregated."""

    n_pca: int = 1
    pca_dims: int | None = None
    n_classes: int = 64

    def __post_init__(self) -> None:
        _check_int("n_pca", self.n_pca, 1)
        if self.pca_dims is not None:
            _check_int("pca_dims", self.pca_dims, 1)
        _check_int("n_classes", self.n_classes, 1, 1000)


@dataclass(frozen=True)
class DatasetConfig:
    """One image collection: where its files and ground truth are, and how to process it."""

    name: str
    layout: Layout
    images: Path
    groundtruth: Path | None = None
    pca_from: str | None = None
    shard_by: ShardBy = "batch"
    shard_size: int = 1000
    query_protocol: QueryProtocol = "paper"
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    generate: str | None = None
    optional: bool = False
    description: str = ""

    @property
    def has_groundtruth(self) -> bool:
        """All layouts but ``folder`` define queries and positives."""
        return self.layout != "folder"

    @property
    def grouped(self) -> bool:
        """Images grouped into objects (ukbench, holidays): every image is a query of its
        object, and the dataset may learn its PCA by ``self-split``."""
        return self.layout in NAMED_GT_LAYOUTS

    @property
    def self_split(self) -> bool:
        """Each half of the objects is searched with PCA learned on the other half."""
        return self.pca_from == SELF_SPLIT

    @property
    def generate_root(self) -> Path | None:
        """Root to pass to :func:`cw_pipeline.core.demo.generate_demo` (``generate: demo``)."""
        return self.images.parent.parent if self.generate == "demo" else None


@dataclass(frozen=True)
class EvaluationConfig:
    """A benchmark run: a dataset with ground truth, optional distractor sets, methods."""

    name: str
    dataset: str
    distractors: tuple[str, ...] = ()
    methods: tuple[MethodSpec, ...] = ()
    schedule: str | None = None
    implicit: bool = False  #: True for the evaluation every ground-truth dataset gets
    description: str = ""


@dataclass(frozen=True)
class ProjectConfig:
    """The whole validated configuration. Only enabled datasets and evaluations are listed."""

    source: Path
    warehouse: str
    reports: str
    defaults: ExtractionSettings
    datasets: dict[str, DatasetConfig]
    evaluations: dict[str, EvaluationConfig]
    search: SearchSettings
    methods: tuple[MethodSpec, ...]
    disabled_datasets: dict[str, str] = field(default_factory=dict)  #: name -> reason
    disabled_evaluations: dict[str, str] = field(default_factory=dict)  #: name -> reason
    warnings: tuple[str, ...] = ()

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

    def pca_users(self, dataset: str) -> tuple[DatasetConfig, ...]:
        """Datasets whose PCA is trained on ``dataset``'s features (itself if self-split)."""
        self.dataset(dataset)
        return tuple(
            d
            for _, d in sorted(self.datasets.items())
            if d.pca_from == dataset or (d.name == dataset and d.self_split)
        )


# --------------------------------------------------------------------------------------------
# locating the file
# --------------------------------------------------------------------------------------------


def project_root() -> Path:
    """The folder holding ``pyproject.toml`` above this file, else the working directory."""
    here = Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return Path.cwd()


def default_config_path() -> Path:
    """``$CW_PIPELINE_CONFIG`` if set, else ``<project root>/data/datasets.yaml``."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    return project_root() / "data" / "datasets.yaml"


# --------------------------------------------------------------------------------------------
# YAML with duplicate-key detection
# --------------------------------------------------------------------------------------------


class _DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects repeated keys in a mapping (YAML would keep the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise _DuplicateKeyError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


# --------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------

_TOP_KEYS = ("warehouse", "reports", "defaults", "datasets", "evaluations", "methods", "search")
_EXTRACTION_KEYS = tuple(f.name for f in fields(ExtractionSettings))
_DATASET_KEYS = (
    "layout",
    "images",
    "groundtruth",
    "pca_from",
    "shard_by",
    "shard_size",
    "query_protocol",
    "generate",
    "optional",
    "description",
    *_EXTRACTION_KEYS,
)
_EVALUATION_KEYS = ("dataset", "distractors", "methods", "schedule", "description")
_SEARCH_KEYS = tuple(f.name for f in fields(SearchSettings))


def _identifier(name: str) -> str:
    """The Python identifier Dagster derives from a name (op names): non-alnum -> ``_``."""
    return re.sub(r"[^a-z0-9_]", "_", name)


class _Loader:
    def __init__(self, source: Path) -> None:
        self.source = source
        self.base = source.absolute().parent
        self.warnings: list[str] = []
        #: (entry, key or None) -> 1-based line in the YAML file, see :meth:`record_lines`.
        self.lines: dict[tuple[str | None, str | None], int] = {}

    def error(self, entry: str | None, reason: str, key: str | None = None) -> ConfigError:
        """A :class:`ConfigError` at ``entry`` (and its ``key``), with the line it is on."""
        line = self.lines.get((entry, key)) if key is not None else None
        if line is None:
            line = self.lines.get((entry, None))
        return ConfigError(reason, source=self.source, entry=entry, line=line)

    def record_lines(self, text: str) -> None:
        """Remember the line of every top-level key, dataset and evaluation entry, and of the
        keys inside them, under the ``(entry, key)`` that :meth:`error` looks up."""
        try:
            root = yaml.compose(text, Loader=_StrictLoader)
        except yaml.YAMLError:  # pragma: no cover - yaml.load accepted the same text
            return
        if not isinstance(root, yaml.MappingNode):
            return

        def keys(node: yaml.Node) -> list[tuple[str, yaml.Node, int]]:
            if not isinstance(node, yaml.MappingNode):
                return []
            return [
                (k.value, v, k.start_mark.line + 1)
                for k, v in node.value
                if isinstance(k, yaml.ScalarNode)
            ]

        kinds = {"datasets": "dataset", "evaluations": "evaluation"}
        for top, value, line in keys(root):
            self.lines[(top, None)] = line
            for name, sub, sub_line in keys(value):
                self.lines[(top, name)] = sub_line
                if top in kinds:
                    entry = f"{kinds[top]} {name!r}"
                    self.lines[(entry, None)] = sub_line
                    for key, _, key_line in keys(sub):
                        self.lines[(entry, key)] = key_line

    def warn(self, message: str) -> None:
        text = f"{self.source}: {message}"
        logger.warning(text)
        self.warnings.append(text)

    # ---- generic checks -------------------------------------------------------------------

    def mapping(
        self, value: Any, entry: str | None, allowed: Iterable[str] | None
    ) -> dict[str, Any]:
        """``value`` as a dict (None -> {}); with ``allowed``, other keys are errors."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(entry, f"expected a mapping, got {type(value).__name__}")
        if allowed is None:
            return value
        allowed = tuple(allowed)
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.error(
                    entry,
                    f"unknown key {key!r}{hint} (allowed: {', '.join(allowed)})",
                    str(key),
                )
        return value

    def string(self, value: Any, entry: str, key: str, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.error(entry, f"{key} must be a non-empty string, got {value!r}", key)
        return value

    def choice(self, value: Any, entry: str, key: str, allowed: Iterable[str]) -> str:
        allowed = tuple(allowed)
        if value not in allowed:
            raise self.error(
                entry, f"unknown {key} {value!r} (expected one of {', '.join(allowed)})", key
            )
        return value

    def expand(self, value: str, entry: str, key: str) -> str:
        def replace(m: re.Match[str]) -> str:
            name, default = m[1], m[2]
            env = os.environ.get(name)
            if env:
                return env
            if default is not None:
                return default
            raise self.error(entry, f"{key}: environment variable {name!r} is not set", key)

        return os.path.expanduser(_ENV_RE.sub(replace, value))

    def local_path(self, value: Any, entry: str, key: str) -> Path:
        """An absolute local path: variables expanded, relative to the YAML file's folder."""
        return self._to_path(
            self.expand(self.string(value, entry, key) or "", entry, key), entry, key
        )

    def _to_path(self, text: str, entry: str, key: str) -> Path:
        if text.startswith("file://"):
            text = text[len("file://") :]
        elif _URL_RE.match(text):
            raise self.error(entry, f"{key} must be a local path, got URL {text!r}", key)
        path = Path(text)
        return Path(os.path.normpath(path if path.is_absolute() else self.base / path))

    def location(self, value: Any, entry: str) -> str:
        """A local path (made absolute) or a URL (kept as written, variables expanded)."""
        text = self.expand(self.string(value, entry, entry) or "", entry, entry)
        if _URL_RE.match(text) and not text.startswith("file://"):
            return text
        return str(self._to_path(text, entry, entry))

    # ---- sections -------------------------------------------------------------------------

    def extraction(
        self, raw: Mapping[str, Any], entry: str, base: ExtractionSettings | None
    ) -> ExtractionSettings:
        values = {k: raw[k] for k in _EXTRACTION_KEYS if k in raw}
        weights = values.get("weights")
        if isinstance(weights, str) and _looks_like_path(weights):
            path = self.local_path(weights, entry, "weights")
            if not path.is_file():
                raise self.error(entry, f"weights file not found: {path}")
            values["weights"] = str(path)
        try:
            if base is None:
                return ExtractionSettings(**values)
            merged = {f.name: getattr(base, f.name) for f in fields(ExtractionSettings)}
            return ExtractionSettings(**{**merged, **values})
        except ValueError as exc:
            raise self.error(entry, str(exc)) from None

    def methods(self, value: Any, entry: str) -> tuple[MethodSpec, ...]:
        if not isinstance(value, list) or not value:
            raise self.error(entry, f"methods must be a non-empty list, got {value!r}")
        specs: list[MethodSpec] = []
        for item in value:
            try:
                spec = MethodSpec.parse(item)
            except ValueError as exc:
                raise self.error(entry, str(exc)) from None
            if spec.name != item:  # the YAML must spell methods canonically
                raise self.error(entry, f"invalid method {item!r}: write it as {spec.name!r}")
            if spec in specs:
                raise self.error(entry, f"method {spec.name!r} is listed twice")
            specs.append(spec)
        return tuple(specs)

    def search(self, raw: Any) -> SearchSettings:
        values = self.mapping(raw, "search", _SEARCH_KEYS)
        try:
            return SearchSettings(**values)
        except ValueError as exc:
            raise self.error("search", str(exc)) from None

    def layout_and_images(self, raw: dict[str, Any], entry: str) -> tuple[str, Path]:
        """A dataset entry's ``layout`` and ``images`` folder (which need not exist yet)."""
        if "layout" not in raw:
            raise self.error(entry, f"missing 'layout' (one of {', '.join(LAYOUTS)})")
        layout = self.choice(raw["layout"], entry, "layout", LAYOUTS)
        if "images" not in raw:
            raise self.error(entry, "missing 'images' (the image folder)")
        return layout, self.local_path(raw["images"], entry, "images")

    def dataset(
        self, name: Any, raw: Any, defaults: ExtractionSettings
    ) -> tuple[DatasetConfig, str | None]:
        """Parse one dataset; returns it and, for a missing optional one, why it is off."""
        entry = f"dataset {name!r}"
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise self.error(
                entry,
                "invalid name: use lowercase letters, digits, '-' and '_', starting with a "
                "letter or digit",
            )
        raw = self.mapping(raw, entry, _DATASET_KEYS)
        layout, images = self.layout_and_images(raw, entry)
        optional = raw.get("optional", False)
        if not isinstance(optional, bool):
            raise self.error(entry, f"optional must be true or false, got {optional!r}")
        generate = raw.get("generate")
        if generate is not None:
            generate = self.choice(generate, entry, "generator", GENERATORS)
        description = raw.get("description", "")
        if not isinstance(description, str):
            raise self.error(entry, "description must be a string")

        groundtruth: Path | None = None
        if layout in GT_FOLDER_LAYOUTS or layout in GT_FILE_LAYOUTS:
            if raw.get("groundtruth") is None:
                what = "folder" if layout in GT_FOLDER_LAYOUTS else "gnd_*.pkl file"
                raise self.error(entry, f"layout {layout!r} needs 'groundtruth' (a {what})")
            groundtruth = self.local_path(raw["groundtruth"], entry, "groundtruth")
        elif raw.get("groundtruth") is not None:
            raise self.error(
                entry,
                f"layout {layout!r} takes no 'groundtruth'"
                + (
                    " (it follows from the file names)"
                    if layout in NAMED_GT_LAYOUTS
                    else " (a folder layout has no queries)"
                ),
            )

        shard_by = self.choice(raw.get("shard_by", "batch"), entry, "shard_by", SHARD_BY)
        if shard_by == "folder" and "shard_size" in raw:
            raise self.error(entry, "shard_size only applies to shard_by: batch")
        shard_size = raw.get("shard_size", 1000)
        try:
            _check_int("shard_size", shard_size, 1)
        except ValueError as exc:
            raise self.error(entry, str(exc)) from None
        protocol_default = "crop" if layout == "revisited" else "paper"
        protocol = self.choice(
            raw.get("query_protocol", protocol_default), entry, "query_protocol", QUERY_PROTOCOLS
        )
        pca_from = raw.get("pca_from")
        if pca_from is not None:
            self.string(pca_from, entry, "pca_from")
        extraction = self.extraction(raw, entry, defaults)
        ds = DatasetConfig(
            name=name,
            layout=layout,  # type: ignore[arg-type]
            images=images,
            groundtruth=groundtruth,
            pca_from=pca_from,
            shard_by=shard_by,  # type: ignore[arg-type]
            shard_size=shard_size,
            query_protocol=protocol,  # type: ignore[arg-type]
            extraction=extraction,
            generate=generate,
            optional=optional,
            description=description,
        )
        if generate == "demo":
            self.check_demo(ds, entry)
            return ds, None
        problem, key = None, "images"
        if not images.is_dir():
            problem = f"image folder not found: {images}"
        elif groundtruth is not None:
            key = "groundtruth"
            if layout in GT_FOLDER_LAYOUTS and not groundtruth.is_dir():
                problem = f"ground-truth folder not found: {groundtruth}"
            elif layout in GT_FILE_LAYOUTS and not groundtruth.is_file():
                problem = f"ground-truth file not found: {groundtruth}"
        if problem is not None:
            if not optional:
                raise self.error(entry, problem, key)
            return ds, problem
        return ds, None

    def check_demo(self, ds: DatasetConfig, entry: str) -> None:
        from cw_pipeline.core.demo import DEMO_DATASETS

        part = ds.images.parent.name
        if ds.images.name != "jpg" or part not in DEMO_DATASETS:
            raise self.error(
                entry,
                f"generate: demo needs images '<root>/<part>/jpg' with part one of "
                f"{', '.join(DEMO_DATASETS)}, got {ds.images}",
            )
        expected: Layout = "folder" if part == "demo-distractors" else "oxford"
        if ds.layout != expected:
            raise self.error(entry, f"the demo part {part!r} has layout {expected!r}")
        if ds.groundtruth is not None and ds.groundtruth != ds.images.parent / "gt":
            raise self.error(
                entry, f"the demo ground truth is {ds.images.parent / 'gt'}, not {ds.groundtruth}"
            )

    def evaluation(self, name: Any, raw: Any, methods: tuple[MethodSpec, ...]) -> EvaluationConfig:
        entry = f"evaluation {name!r}"
        if not isinstance(name, str) or not _EVAL_NAME_RE.fullmatch(name):
            raise self.error(
                entry,
                "invalid name: use lowercase letters, digits, '-', '_' and '+', starting with "
                "a letter or digit",
            )
        raw = self.mapping(raw, entry, _EVALUATION_KEYS)
        dataset = self.string(raw.get("dataset"), entry, "dataset")
        distractors = raw.get("distractors", [])
        if distractors is None:
            distractors = []
        if not isinstance(distractors, list) or not all(isinstance(d, str) for d in distractors):
            raise self.error(entry, f"distractors must be a list of names, got {distractors!r}")
        if len(set(distractors)) != len(distractors):
            raise self.error(entry, f"distractors lists a set twice: {distractors}")
        schedule = raw.get("schedule")
        if schedule is not None:
            self.check_cron(schedule, entry)
        description = raw.get("description", "")
        if not isinstance(description, str):
            raise self.error(entry, "description must be a string")
        own = self.methods(raw["methods"], entry) if "methods" in raw else methods
        return EvaluationConfig(
            name=name,
            dataset=dataset or "",
            distractors=tuple(distractors),
            methods=own,
            schedule=schedule,
            description=description,
        )

    def check_cron(self, value: Any, entry: str) -> None:
        if isinstance(value, str):
            text = value.strip()
            if text in _CRON_ALIASES:
                return
            parts = text.split()
            if len(parts) == 5 and all(_CRON_FIELD_RE.fullmatch(p) for p in parts):
                return
        raise self.error(
            entry,
            f"invalid schedule {value!r}: expected a 5-field cron string such as '0 3 * * *' "
            f"or one of {', '.join(sorted(_CRON_ALIASES))}",
        )

    # ---- the whole file -------------------------------------------------------------------

    def read(self) -> Any:
        """The parsed YAML document (not yet validated)."""
        from cw_pipeline.core.datasets import TextDecodeError, decode_text

        try:
            text = decode_text(self.source.read_bytes(), self.source)
        except FileNotFoundError:
            raise self.error(None, "config file not found") from None
        except OSError as exc:
            raise self.error(None, f"cannot read config file ({exc})") from None
        except TextDecodeError as exc:
            raise ConfigError(exc.reason, source=self.source, line=exc.line) from None
        try:
            data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise self.error(None, f"invalid YAML: {exc}") from None
        if data is None:
            raise self.error(None, "the file is empty")
        self.record_lines(text)
        return data

    def load(self) -> ProjectConfig:
        top = self.mapping(self.read(), None, _TOP_KEYS)

        warehouse = self.location(top.get("warehouse", "warehouse"), "warehouse")
        reports = self.location(top.get("reports", "reports"), "reports")
        defaults = self.extraction(
            self.mapping(top.get("defaults"), "defaults", _EXTRACTION_KEYS), "defaults", None
        )
        methods = self.methods(top.get("methods", list(DEFAULT_METHODS)), "methods")
        search = self.search(top.get("search"))

        raw_datasets = self.mapping(top.get("datasets"), "datasets", None)
        datasets: dict[str, DatasetConfig] = {}
        disabled: dict[str, str] = {}
        for name, raw in raw_datasets.items():
            ds, problem = self.dataset(name, raw, defaults)
            datasets[name] = ds
            if problem is not None:
                disabled[name] = f"{problem} (optional dataset disabled)"
        self.check_unique_identifiers(datasets, "dataset")
        self.check_pca_sources(datasets, disabled)

        raw_evals = self.mapping(top.get("evaluations"), "evaluations", None)
        evaluations: dict[str, EvaluationConfig] = {}
        for name, raw in raw_evals.items():
            evaluations[name] = self.evaluation(name, raw, methods)
        for name, ds in datasets.items():
            if not ds.has_groundtruth or name in disabled:
                continue
            explicit = evaluations.get(name)
            if explicit is None:
                evaluations[name] = EvaluationConfig(name, name, (), methods, implicit=True)
        self.check_unique_identifiers(evaluations, "evaluation")
        disabled_evals = self.check_evaluations(evaluations, datasets, disabled, search)

        for name, reason in disabled.items():
            self.warn(f"dataset {name!r} disabled: {reason}")
        for name, reason in disabled_evals.items():
            self.warn(f"evaluation {name!r} disabled: {reason}")
        return ProjectConfig(
            source=self.source,
            warehouse=warehouse,
            reports=reports,
            defaults=defaults,
            datasets={n: d for n, d in datasets.items() if n not in disabled},
            evaluations={n: e for n, e in evaluations.items() if n not in disabled_evals},
            search=search,
            methods=methods,
            disabled_datasets=disabled,
            disabled_evaluations=disabled_evals,
            warnings=tuple(self.warnings),
        )

    def check_unique_identifiers(self, items: Mapping[str, Any], kind: str) -> None:
        seen: dict[str, str] = {}
        for name in items:
            ident = _identifier(name)
            if ident in seen:
                raise self.error(
                    f"{kind} {name!r}",
                    f"name clashes with {kind} {seen[ident]!r} (both become {ident!r} in "
                    "Dagster op names)",
                )
            seen[ident] = name

    def check_pca_sources(
        self, datasets: dict[str, DatasetConfig], disabled: dict[str, str]
    ) -> None:
        for name, ds in datasets.items():
            entry = f"dataset {name!r}"
            src = ds.pca_from
            if src is None:
                if ds.has_groundtruth:
                    hint = f" or {SELF_SPLIT!r}" if ds.layout in NAMED_GT_LAYOUTS else ""
                    raise self.error(
                        entry,
                        "pca_from is required for a dataset with ground truth (the dataset "
                        f"whose features train its PCA{hint})",
                    )
                continue
            if src == SELF_SPLIT:
                if ds.layout not in NAMED_GT_LAYOUTS:
                    raise self.error(
                        entry,
                        f"pca_from: {SELF_SPLIT} needs a layout that groups images into "
                        f"objects ({', '.join(sorted(NAMED_GT_LAYOUTS))}), not {ds.layout!r}",
                    )
                continue
            if src == name:
                raise self.error(
                    entry,
                    "pca_from names the dataset itself (PCA must be learned on other images"
                    + (f"; use {SELF_SPLIT!r}" if ds.layout in NAMED_GT_LAYOUTS else "")
                    + ")",
                )
            other = datasets.get(src)
            if other is None:
                raise self.error(
                    entry,
                    f"pca_from: unknown dataset {src!r} (known: {', '.join(sorted(datasets))})",
                )
            if other.extraction.feature_space != ds.extraction.feature_space:
                raise self.error(
                    entry,
                    f"pca_from {src!r} has incompatible features: backbone/layer/weights "
                    f"{other.extraction.feature_space} vs {ds.extraction.feature_space}",
                )
        changed = True
        while changed:  # a dataset whose PCA source is off is off too
            changed = False
            for name, ds in datasets.items():
                src = ds.pca_from
                if name not in disabled and src in disabled and src != SELF_SPLIT:
                    disabled[name] = f"its PCA source {src!r} is disabled"
                    changed = True

    def check_evaluations(
        self,
        evaluations: dict[str, EvaluationConfig],
        datasets: dict[str, DatasetConfig],
        disabled: dict[str, str],
        search: SearchSettings,
    ) -> dict[str, str]:
        off: dict[str, str] = {}
        for name, ev in evaluations.items():
            entry = f"evaluation {name!r}"
            ds = datasets.get(ev.dataset)
            if ds is None:
                raise self.error(
                    entry,
                    f"unknown dataset {ev.dataset!r} (known: {', '.join(sorted(datasets))})",
                )
            if not ds.has_groundtruth:
                raise self.error(
                    entry, f"dataset {ev.dataset!r} has layout 'folder' and no ground truth"
                )
            if name in datasets and name != ev.dataset:
                raise self.error(
                    entry,
                    f"the name is taken by dataset {name!r}; an evaluation named after a "
                    "dataset must evaluate that dataset",
                )
            if ev.distractors and ds.pca_from == SELF_SPLIT:
                raise self.error(
                    entry,
                    f"dataset {ev.dataset!r} learns its PCA by {SELF_SPLIT} (each half of its "
                    "objects searched with PCA from the other), which cannot add distractor "
                    "images; evaluate it without distractors or give it another pca_from",
                    key="distractors",
                )
            for d in ev.distractors:
                dist = datasets.get(d)
                if dist is None:
                    raise self.error(
                        entry,
                        f"unknown distractor set {d!r} (known: {', '.join(sorted(datasets))})",
                    )
                if dist.layout != "folder":
                    raise self.error(
                        entry,
                        f"distractor set {d!r} must have layout 'folder', not {dist.layout!r}",
                    )
                if d == ev.dataset:
                    raise self.error(entry, f"{d!r} is both the dataset and a distractor set")
                if dist.extraction.feature_space != ds.extraction.feature_space:
                    raise self.error(
                        entry,
                        f"distractor set {d!r} has incompatible features: backbone/layer/"
                        f"weights {dist.extraction.feature_space} vs "
                        f"{ds.extraction.feature_space}",
                    )
            for d in (ev.dataset, *ev.distractors):
                stored = datasets[d].extraction.n_classes
                if search.n_classes > stored:
                    raise self.error(
                        entry,
                        f"search.n_classes = {search.n_classes} exceeds the {stored} classes "
                        f"stored per image for dataset {d!r}",
                    )
            src = datasets[ds.pca_from] if ds.pca_from not in (None, SELF_SPLIT) else ds
            if search.n_pca > src.extraction.n_classes:
                raise self.error(
                    entry,
                    f"search.n_pca = {search.n_pca} exceeds the {src.extraction.n_classes} "
                    f"classes stored per image for PCA source {src.name!r}",
                )
            off_parts = [d for d in (ev.dataset, *ev.distractors) if d in disabled]
            if off_parts:
                off[name] = f"uses disabled dataset(s) {', '.join(repr(d) for d in off_parts)}"
        return off


def _looks_like_path(weights: str) -> bool:
    """Whether a ``weights`` value names a file (else it is a keyword such as 'packaged')."""
    return (
        "/" in weights
        or os.sep in weights
        or weights.startswith(("~", ".", "$"))
        or weights.lower().endswith(_WEIGHT_FILE_SUFFIXES)
    )


@dataclass(frozen=True)
class DatasetLocation:
    """Where a dataset entry of the YAML puts its files (which need not exist yet)."""

    name: str
    layout: str
    images: Path
    groundtruth: Path | None
    source: Path  #: the YAML file


def dataset_location(name: str, path: Path | str | None = None) -> DatasetLocation | None:
    """Layout, image folder and ground truth of dataset ``name`` as the YAML file writes them.

    Only that entry is read and checked; paths are resolved as :func:`load_config` resolves
    them (variables, ``~``, relative to the file's folder), but need not exist — this is for
    ``cw-pipeline download``, which creates the folders :func:`load_config` requires. None when
    the file has no such entry (e.g. it is commented out).

    Raises:
        ConfigError: unreadable file, invalid YAML, or an invalid entry.
    """
    source = Path(path) if path is not None else default_config_path()
    loader = _Loader(source)
    top = loader.mapping(loader.read(), None, None)
    raw = loader.mapping(top.get("datasets"), "datasets", None).get(name)
    if raw is None:
        return None
    entry = f"dataset {name!r}"
    raw = loader.mapping(raw, entry, _DATASET_KEYS)
    layout, images = loader.layout_and_images(raw, entry)
    gt = raw.get("groundtruth")
    groundtruth = None if gt is None else loader.local_path(gt, entry, "groundtruth")
    return DatasetLocation(name, layout, images, groundtruth, source)


def load_config(path: Path | str | None = None) -> ProjectConfig:
    """Load and validate a ``datasets.yaml`` (default: :func:`default_config_path`).

    Raises:
        ConfigError: anything invalid; the message names the file and the entry.
    """
    source = Path(path) if path is not None else default_config_path()
    return _Loader(source).load()
