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

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ValidationError, field_validator, model_validator

from cw_pipeline.core.experiment import SearchParams
from cw_pipeline.core.extract import ExtractionConfig, RuntimeConfig
from cw_pipeline.core.methods import AGGREGATIONS, Method
from cw_pipeline.core.validation import Settings, bounded_int, error_key, error_message

#: Methods as the YAML writes them (``MethodSpec`` is :class:`core.methods.Method`).
MethodSpec = Method

__all__ = [
    "AGGREGATIONS",
    "CONFIG_ENV",
    "DEFAULT_METHODS",
    "LAYOUTS",
    "SELF_SPLIT",
    "ConfigError",
    "DatasetConfig",
    "DatasetDefaults",
    "DatasetLocation",
    "EvaluationConfig",
    "ExtractionConfig",
    "MethodSpec",
    "ProjectConfig",
    "RuntimeConfig",
    "SearchParams",
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
_CRON_FIELD_RE = re.compile(r"[0-9A-Za-z*/,?#-]+")
_CRON_ALIASES = frozenset({"@hourly", "@daily", "@weekly", "@monthly"})


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
                if layout in NAMED_GT_LAYOUTS
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
        return self.layout in NAMED_GT_LAYOUTS

    @property
    def self_split(self) -> bool:
        """Each half of the objects is searched with PCA learned on the other half."""
        return self.pca_from == SELF_SPLIT

    @property
    def generate_root(self) -> Path | None:
        """Root to pass to :func:`cw_pipeline.core.demo.generate_demo` (``generate: demo``)."""
        return self.images.parent.parent if self.generate == "demo" else None


class EvaluationConfig(Settings):
    """A benchmark run: a dataset with ground truth, optional distractor sets, methods."""

    name: str
    dataset: str
    distractors: tuple[str, ...] = ()
    methods: tuple[Method, ...] = ()
    schedule: str | None = None
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
# the loader: YAML → models, with the file, line and entry of every error
# --------------------------------------------------------------------------------------------

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")

_TOP_KEYS = ("warehouse", "reports", "defaults", "datasets", "evaluations", "methods", "search")
_EXTRACTION_KEYS = tuple(ExtractionConfig.model_fields)
_RUNTIME_KEYS = tuple(RuntimeConfig.model_fields)
_DEFAULTS_KEYS = (*_EXTRACTION_KEYS, *_RUNTIME_KEYS)
_DATASET_KEYS = (
    *(k for k in DatasetConfig.model_fields if k not in ("name", "extraction", "runtime")),
    *_DEFAULTS_KEYS,
)
_EVALUATION_KEYS = ("dataset", "distractors", "methods", "schedule", "description")
_SEARCH_KEYS = tuple(SearchParams.model_fields)
#: Keys renamed when the three ``n_classes`` knobs got names saying which number they are.
_RENAMED = {
    "defaults": {"n_classes": "stored_classes (classes stored per image)"},
    "dataset": {"n_classes": "stored_classes (classes stored per image)"},
    "search": {"n_classes": "aggregated_classes (classes aggregated per search)"},
}
_MISSING = {
    "layout": f"missing 'layout' (one of {', '.join(LAYOUTS)})",
    "images": "missing 'images' (the image folder)",
    "dataset": "dataset must be a non-empty string, got None",
}


def _identifier(name: str) -> str:
    """The Python identifier Dagster derives from a name (op names): non-alnum -> ``_``."""
    return re.sub(r"[^a-z0-9_]", "_", name)


@dataclass
class _File:
    """A YAML file being loaded: where it is, the line of each key, the warnings so far."""

    source: Path
    lines: dict[tuple[str | None, str | None], int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def base(self) -> Path:
        return self.source.absolute().parent

    def error(self, entry: str | None, reason: str, key: str | None = None) -> ConfigError:
        """A :class:`ConfigError` at ``entry`` (and its ``key``), with the line it is on."""
        line = self.lines.get((entry, key)) if key is not None else None
        if line is None:
            line = self.lines.get((entry, None))
        return ConfigError(reason, source=self.source, entry=entry, line=line)

    def invalid(
        self, exc: ValidationError, entry: str | None, model: type[BaseModel]
    ) -> ConfigError:
        """The first error of a model's validation, as a :class:`ConfigError`."""
        err = exc.errors()[0]
        key = error_key(err)
        if err["type"] == "missing" and key in _MISSING:
            return self.error(entry, _MISSING[key], key)
        if err["type"] in ("dict_type", "model_type"):
            got = type(err.get("input")).__name__
            return self.error(entry, f"expected a mapping, got {got}", key)
        allowed = _fields_at(model, err["loc"])
        return self.error(entry, error_message(err, allowed, {"generate": "generator"}), key)

    def warn(self, message: str) -> None:
        text = f"{self.source}: {message}"
        logger.warning(text)
        self.warnings.append(text)

    def read(self) -> Any:
        """The parsed YAML document (not yet validated); records the line of every key."""
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
        self.lines = _key_lines(text)
        return data

    def mapping(self, value: Any, entry: str | None, allowed: Iterable[str] | None) -> dict:
        """``value`` as a dict (None -> {}); with ``allowed``, other keys are errors."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(entry, f"expected a mapping, got {type(value).__name__}")
        allowed = tuple(allowed) if allowed is not None else None
        for key in value if allowed is not None else ():
            if not isinstance(key, str) or key not in allowed:  # type: ignore[operator]
                err = {"type": "extra_forbidden", "loc": (str(key),), "input": value[key]}
                raise self.error(entry, error_message(err, allowed or ()), str(key))
        return value

    def renamed(self, raw: dict, entry: str | None, kind: str) -> dict:
        """``raw`` with the old names of renamed keys replaced (and a warning for each)."""
        out = dict(raw)
        for old, new in _RENAMED[kind].items():
            if old not in out:
                continue
            key = new.split()[0]
            if key in out:
                raise self.error(
                    entry, f"{old!r} is the old name of {key!r}: set only {key!r}", old
                )
            self.warn(f"{entry}: {old!r} is now called {new}; please rename it")
            out[key] = out.pop(old)
        return out

    def string(self, value: Any, entry: str, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(entry, f"{key} must be a non-empty string, got {value!r}", key)
        return value

    def expand(self, value: str, entry: str, key: str) -> str:
        def replace(m: re.Match[str]) -> str:
            env = os.environ.get(m[1])
            if env:
                return env
            if m[2] is not None:
                return m[2]
            raise self.error(entry, f"{key}: environment variable {m[1]!r} is not set", key)

        return os.path.expanduser(_ENV_RE.sub(replace, value))

    def local_path(self, value: Any, entry: str, key: str) -> Path:
        """An absolute local path: variables expanded, relative to the YAML file's folder."""
        text = self.expand(self.string(value, entry, key), entry, key)
        if text.startswith("file://"):
            text = text[len("file://") :]
        elif _URL_RE.match(text):
            raise self.error(entry, f"{key} must be a local path, got URL {text!r}", key)
        path = Path(text)
        return Path(os.path.normpath(path if path.is_absolute() else self.base / path))

    def location(self, value: Any, entry: str) -> str:
        """A local path (made absolute) or a URL (kept as written, variables expanded)."""
        text = self.expand(self.string(value, entry, entry), entry, entry)
        if _URL_RE.match(text) and not text.startswith("file://"):
            return text
        return str(self.local_path(text, entry, entry))


def _fields_at(model: type[BaseModel], loc: tuple) -> tuple[str, ...]:
    """The field names of the (nested) model that an error location points into."""
    for part in loc[:-1]:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        sub = getattr(info, "annotation", None)
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            break
        model = sub
    return tuple(model.model_fields)


def _key_lines(text: str) -> dict[tuple[str | None, str | None], int]:
    """The line of every top-level key, dataset and evaluation entry, and of the keys inside
    them, under the ``(entry, key)`` that :meth:`_File.error` looks up."""
    root = yaml.compose(text, Loader=_StrictLoader)

    def keys(node: yaml.Node) -> list[tuple[str, yaml.Node, int]]:
        if not isinstance(node, yaml.MappingNode):
            return []
        return [
            (k.value, v, k.start_mark.line + 1)
            for k, v in node.value
            if isinstance(k, yaml.ScalarNode)
        ]

    lines: dict[tuple[str | None, str | None], int] = {}
    kinds = {"datasets": "dataset", "evaluations": "evaluation"}
    for top, value, line in keys(root):
        lines[(top, None)] = lines[(None, top)] = line
        for name, sub, sub_line in keys(value):
            lines[(top, name)] = sub_line
            if top in kinds:
                entry = f"{kinds[top]} {name!r}"
                lines[(entry, None)] = sub_line
                for key, _, key_line in keys(sub):
                    lines[(entry, key)] = key_line
    return lines


def _looks_like_path(weights: str) -> bool:
    """Whether a ``weights`` value names a file (else it is a keyword such as 'packaged')."""
    return (
        "/" in weights
        or os.sep in weights
        or weights.startswith(("~", ".", "$"))
        or weights.lower().endswith(_WEIGHT_FILE_SUFFIXES)
    )


def _weights_file(f: _File, raw: dict, entry: str) -> dict:
    """``raw`` with a ``weights`` file resolved like other paths (it must exist)."""
    weights = raw.get("weights")
    if not (isinstance(weights, str) and _looks_like_path(weights)):
        return raw
    path = f.local_path(weights, entry, "weights")
    if not path.is_file():
        raise f.error(entry, f"weights file not found: {path}", "weights")
    return {**raw, "weights": str(path)}


def _split_settings(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat YAML keys → ``{"extraction": {...}, "runtime": {...}}``."""
    return {
        "extraction": {k: raw[k] for k in _EXTRACTION_KEYS if k in raw},
        "runtime": {k: raw[k] for k in _RUNTIME_KEYS if k in raw},
    }


def _defaults(f: _File, value: Any) -> tuple[DatasetDefaults, dict[str, Any]]:
    """The ``defaults`` block, validated, and its flat keys (datasets override them)."""
    raw = f.renamed(
        f.mapping(value, "defaults", (*_DEFAULTS_KEYS, "n_classes")), "defaults", "defaults"
    )
    raw = _weights_file(f, raw, "defaults")
    try:
        return DatasetDefaults.model_validate(_split_settings(raw)), raw
    except ValidationError as exc:
        raise f.invalid(exc, "defaults", DatasetDefaults) from None


def _methods(f: _File, value: Any, entry: str) -> tuple[Method, ...]:
    if not isinstance(value, list) or not value:
        raise f.error(entry, f"methods must be a non-empty list, got {value!r}")
    specs: list[Method] = []
    for item in value:
        if not isinstance(item, str):
            raise f.error(entry, f"invalid method {item!r}: expected a string such as 'ofa+qe10'")
        try:
            spec = Method.parse(item)
        except ValueError as exc:
            raise f.error(entry, str(exc)) from None
        if spec.name != item:  # the YAML must spell methods canonically
            raise f.error(entry, f"invalid method {item!r}: write it as {spec.name!r}")
        if spec in specs:
            raise f.error(entry, f"method {spec.name!r} is listed twice")
        specs.append(spec)
    return tuple(specs)


def _search(f: _File, value: Any) -> SearchParams:
    raw = f.renamed(f.mapping(value, "search", (*_SEARCH_KEYS, "n_classes")), "search", "search")
    try:
        return SearchParams.model_validate(raw)
    except ValidationError as exc:
        raise f.invalid(exc, "search", SearchParams) from None


def _dataset(
    f: _File, name: Any, raw: Any, defaults: dict[str, Any]
) -> tuple[DatasetConfig, str | None]:
    """Parse one dataset; returns it and, for a missing optional one, why it is off."""
    entry = f"dataset {name!r}"
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise f.error(
            entry,
            "invalid name: use lowercase letters, digits, '-' and '_', starting with a "
            "letter or digit",
        )
    raw = f.renamed(f.mapping(raw, entry, (*_DATASET_KEYS, "n_classes")), entry, "dataset")
    fields = {k: v for k, v in raw.items() if k not in _DEFAULTS_KEYS}
    if "layout" not in raw:
        raise f.error(entry, _MISSING["layout"])
    if raw.get("shard_by") == "folder" and "shard_size" in raw:
        raise f.error(entry, "shard_size only applies to shard_by: batch", "shard_size")
    for key in ("images", "groundtruth"):
        if fields.get(key) is not None:
            fields[key] = f.local_path(fields[key], entry, key)
    if fields.get("pca_from") is not None:
        f.string(fields["pca_from"], entry, "pca_from")
    settings = _split_settings({**defaults, **_weights_file(f, raw, entry)})
    try:
        ds = DatasetConfig.model_validate({"name": name, **fields, **settings})
    except ValidationError as exc:
        raise f.invalid(exc, entry, DatasetConfig) from None
    if ds.generate == "demo":
        _check_demo(f, ds, entry)
        return ds, None
    problem, key = _missing_files(ds)
    if problem is not None and not ds.optional:
        raise f.error(entry, problem, key)
    return ds, problem


def _missing_files(ds: DatasetConfig) -> tuple[str | None, str]:
    """Why a dataset's image folder or ground truth is missing (None: both are there)."""
    if not ds.images.is_dir():
        return f"image folder not found: {ds.images}", "images"
    gt = ds.groundtruth
    if gt is not None and ds.layout in GT_FOLDER_LAYOUTS and not gt.is_dir():
        return f"ground-truth folder not found: {gt}", "groundtruth"
    if gt is not None and ds.layout in GT_FILE_LAYOUTS and not gt.is_file():
        return f"ground-truth file not found: {gt}", "groundtruth"
    return None, "images"


def _check_demo(f: _File, ds: DatasetConfig, entry: str) -> None:
    from cw_pipeline.core.demo import DEMO_DATASETS

    part = ds.images.parent.name
    if ds.images.name != "jpg" or part not in DEMO_DATASETS:
        raise f.error(
            entry,
            f"generate: demo needs images '<root>/<part>/jpg' with part one of "
            f"{', '.join(DEMO_DATASETS)}, got {ds.images}",
        )
    expected = "folder" if part == "demo-distractors" else "oxford"
    if ds.layout != expected:
        raise f.error(entry, f"the demo part {part!r} has layout {expected!r}")
    if ds.groundtruth is not None and ds.groundtruth != ds.images.parent / "gt":
        raise f.error(
            entry, f"the demo ground truth is {ds.images.parent / 'gt'}, not {ds.groundtruth}"
        )


def _evaluation(f: _File, name: Any, raw: Any, methods: tuple[Method, ...]) -> EvaluationConfig:
    entry = f"evaluation {name!r}"
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise f.error(
            entry,
            "invalid name: use lowercase letters, digits, '-' and '_', starting with a "
            "letter or digit",
        )
    raw = dict(f.mapping(raw, entry, _EVALUATION_KEYS))
    raw["methods"] = _methods(f, raw["methods"], entry) if "methods" in raw else methods
    try:
        return EvaluationConfig.model_validate({"name": name, **raw})
    except ValidationError as exc:
        raise f.invalid(exc, entry, EvaluationConfig) from None


def _check_unique_identifiers(f: _File, items: Iterable[str], kind: str) -> None:
    seen: dict[str, str] = {}
    for name in items:
        ident = _identifier(name)
        if ident in seen:
            raise f.error(
                f"{kind} {name!r}",
                f"name clashes with {kind} {seen[ident]!r} (both become {ident!r} in "
                "Dagster op names)",
            )
        seen[ident] = name


def _check_pca_source(f: _File, ds: DatasetConfig, datasets: dict[str, DatasetConfig]) -> None:
    entry, src = f"dataset {ds.name!r}", ds.pca_from
    grouped = ds.grouped
    if src is None:
        if ds.has_groundtruth:
            hint = f" or {SELF_SPLIT!r}" if grouped else ""
            raise f.error(
                entry,
                "pca_from is required for a dataset with ground truth (the dataset "
                f"whose features train its PCA{hint})",
            )
    elif src == SELF_SPLIT:
        if not grouped:
            raise f.error(
                entry,
                f"pca_from: {SELF_SPLIT} needs a layout that groups images into "
                f"objects ({', '.join(sorted(NAMED_GT_LAYOUTS))}), not {ds.layout!r}",
            )
    elif src == ds.name:
        hint = f"; use {SELF_SPLIT!r}" if grouped else ""
        raise f.error(
            entry, f"pca_from names the dataset itself (PCA must be learned on other images{hint})"
        )
    elif src not in datasets:
        known = ", ".join(sorted(datasets))
        raise f.error(entry, f"pca_from: unknown dataset {src!r} (known: {known})")
    elif datasets[src].extraction.feature_space != ds.extraction.feature_space:
        raise f.error(
            entry,
            f"pca_from {src!r} has incompatible features: backbone/layer/weights "
            f"{datasets[src].extraction.feature_space} vs {ds.extraction.feature_space}",
        )


def _disable_pca_users(datasets: dict[str, DatasetConfig], disabled: dict[str, str]) -> None:
    """A dataset whose PCA source is off is off too (transitively)."""
    changed = True
    while changed:
        changed = False
        for name, ds in datasets.items():
            src = ds.pca_from
            if name not in disabled and src in disabled and src != SELF_SPLIT:
                disabled[name] = f"its PCA source {src!r} is disabled"
                changed = True


def _check_distractors(
    f: _File, ev: EvaluationConfig, ds: DatasetConfig, datasets: dict[str, DatasetConfig]
) -> None:
    entry = f"evaluation {ev.name!r}"
    if ev.distractors and ds.self_split:
        raise f.error(
            entry,
            f"dataset {ev.dataset!r} learns its PCA by {SELF_SPLIT} (each half of its "
            "objects searched with PCA from the other), which cannot add distractor "
            "images; evaluate it without distractors or give it another pca_from",
            key="distractors",
        )
    for d in ev.distractors:
        dist = datasets.get(d)
        if dist is None:
            known = ", ".join(sorted(datasets))
            raise f.error(entry, f"unknown distractor set {d!r} (known: {known})")
        if dist.layout != "folder":
            raise f.error(
                entry, f"distractor set {d!r} must have layout 'folder', not {dist.layout!r}"
            )
        if d == ev.dataset:
            raise f.error(entry, f"{d!r} is both the dataset and a distractor set")
        if dist.extraction.feature_space != ds.extraction.feature_space:
            raise f.error(
                entry,
                f"distractor set {d!r} has incompatible features: backbone/layer/weights "
                f"{dist.extraction.feature_space} vs {ds.extraction.feature_space}",
            )


def _check_classes(
    f: _File,
    ev: EvaluationConfig,
    datasets: dict[str, DatasetConfig],
    search: SearchParams,
) -> None:
    """Every class count the search reads is stored: N_C aggregated (dataset and
    distractors), the re-ranking's query classes (when a method re-ranks), N_pca (PCA source)."""
    ds = datasets[ev.dataset]
    needs = search.class_needs(rerank=any(m.rerank for m in ev.methods))
    n_pca = needs.pop("n_pca")
    checks = [(d, needs) for d in (ev.dataset, *ev.distractors)]
    src = datasets[ds.pca_from] if ds.pca_from not in (None, SELF_SPLIT) else ds
    checks.append((src.name, {"n_pca": n_pca}))
    for name, wanted in checks:
        stored = datasets[name].extraction.stored_classes
        for key, value in wanted.items():
            if value > stored:
                what = "PCA source" if key == "n_pca" else "dataset"
                raise f.error(
                    f"evaluation {ev.name!r}",
                    f"search.{key} = {value} exceeds the {stored} classes stored per image "
                    f"(stored_classes) for {what} {name!r}",
                )


def _check_evaluations(
    f: _File,
    evaluations: dict[str, EvaluationConfig],
    datasets: dict[str, DatasetConfig],
    disabled: dict[str, str],
    search: SearchParams,
) -> dict[str, str]:
    """Cross-entry checks of the evaluations; returns those disabled, with the reason."""
    off: dict[str, str] = {}
    for name, ev in evaluations.items():
        entry = f"evaluation {name!r}"
        ds = datasets.get(ev.dataset)
        if ds is None:
            known = ", ".join(sorted(datasets))
            raise f.error(entry, f"unknown dataset {ev.dataset!r} (known: {known})")
        if not ds.has_groundtruth:
            raise f.error(entry, f"dataset {ev.dataset!r} has layout 'folder' and no ground truth")
        if name in datasets and name != ev.dataset:
            raise f.error(
                entry,
                f"the name is taken by dataset {name!r}; an evaluation named after a "
                "dataset must evaluate that dataset",
            )
        _check_distractors(f, ev, ds, datasets)
        _check_classes(f, ev, datasets, search)
        off_parts = [d for d in (ev.dataset, *ev.distractors) if d in disabled]
        if off_parts:
            off[name] = f"uses disabled dataset(s) {', '.join(repr(d) for d in off_parts)}"
    return off


def _load(f: _File) -> ProjectConfig:
    top = f.mapping(f.read(), None, _TOP_KEYS)
    warehouse = f.location(top.get("warehouse", "warehouse"), "warehouse")
    reports = f.location(top.get("reports", "reports"), "reports")
    defaults, flat_defaults = _defaults(f, top.get("defaults"))
    methods = _methods(f, top.get("methods", list(DEFAULT_METHODS)), "methods")
    search = _search(f, top.get("search"))

    datasets: dict[str, DatasetConfig] = {}
    disabled: dict[str, str] = {}
    for name, raw in f.mapping(top.get("datasets"), "datasets", None).items():
        datasets[name], problem = _dataset(f, name, raw, flat_defaults)
        if problem is not None:
            disabled[name] = f"{problem} (optional dataset disabled)"
    _check_unique_identifiers(f, datasets, "dataset")
    for ds in datasets.values():
        _check_pca_source(f, ds, datasets)
    _disable_pca_users(datasets, disabled)

    evaluations: dict[str, EvaluationConfig] = {}
    for name, raw in f.mapping(top.get("evaluations"), "evaluations", None).items():
        evaluations[name] = _evaluation(f, name, raw, methods)
    for name, ds in datasets.items():
        if ds.has_groundtruth and name not in disabled and name not in evaluations:
            evaluations[name] = EvaluationConfig(
                name=name, dataset=name, methods=methods, implicit=True
            )
    _check_unique_identifiers(f, evaluations, "evaluation")
    disabled_evals = _check_evaluations(f, evaluations, datasets, disabled, search)

    for name, reason in disabled.items():
        f.warn(f"dataset {name!r} disabled: {reason}")
    for name, reason in disabled_evals.items():
        f.warn(f"evaluation {name!r} disabled: {reason}")
    return ProjectConfig(
        source=f.source,
        warehouse=warehouse,
        reports=reports,
        defaults=defaults,
        datasets={n: d for n, d in datasets.items() if n not in disabled},
        evaluations={n: e for n, e in evaluations.items() if n not in disabled_evals},
        search=search,
        methods=methods,
        disabled_datasets=disabled,
        disabled_evaluations=disabled_evals,
        warnings=tuple(f.warnings),
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
    f = _File(Path(path) if path is not None else default_config_path())
    top = f.mapping(f.read(), None, None)
    raw = f.mapping(top.get("datasets"), "datasets", None).get(name)
    if raw is None:
        return None
    entry = f"dataset {name!r}"
    raw = f.mapping(raw, entry, (*_DATASET_KEYS, "n_classes"))
    if "layout" not in raw:
        raise f.error(entry, _MISSING["layout"])
    if raw["layout"] not in LAYOUTS:
        err = {"type": "literal_error", "loc": ("layout",), "input": raw["layout"],
               "ctx": {"expected": " or ".join(LAYOUTS)}}  # fmt: skip
        raise f.error(entry, error_message(err), "layout")
    if "images" not in raw:
        raise f.error(entry, _MISSING["images"])
    images = f.local_path(raw["images"], entry, "images")
    gt = raw.get("groundtruth")
    groundtruth = None if gt is None else f.local_path(gt, entry, "groundtruth")
    return DatasetLocation(name, raw["layout"], images, groundtruth, f.source)


def load_config(path: Path | str | None = None) -> ProjectConfig:
    """Load and validate a ``datasets.yaml`` (default: :func:`default_config_path`).

    Raises:
        ConfigError: anything invalid; the message names the file and the entry.
    """
    return _load(_File(Path(path) if path is not None else default_config_path()))
