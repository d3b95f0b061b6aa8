"""``datasets.yaml`` -> :class:`~cw_pipeline.config.models.ProjectConfig`: where the file is
(:func:`default_config_path`), the keys each block accepts, the checks across entries (unique
names, PCA sources, distractor sets, classes, demo folders, ``optional`` datasets disabled with
a warning), :func:`load_config` and :func:`dataset_location` (one entry, for ``download``)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cw_pipeline.config.models import (
    CONFIG_ENV,
    DEFAULT_METHODS,
    SELF_SPLIT,
    DatasetConfig,
    DatasetDefaults,
    EvaluationConfig,
    FeatureMapsConfig,
    ProjectConfig,
)
from cw_pipeline.config.yaml_file import ConfigError, ConfigFile
from cw_pipeline.core.datasets.layouts import (
    GROUPED_LAYOUTS,
    GT_FILE_LAYOUTS,
    GT_FOLDER_LAYOUTS,
    LAYOUTS,
)
from cw_pipeline.core.demo import DEMO_DATASETS
from cw_pipeline.core.extract import ExtractionConfig, RuntimeConfig
from cw_pipeline.core.methods import Method
from cw_pipeline.core.search_settings import SearchParams
from cw_pipeline.core.validation import error_message

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")


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
# the loader: YAML → models, with the file, line and entry of every error
# --------------------------------------------------------------------------------------------

_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")

_TOP_KEYS = (
    "warehouse",
    "reports",
    "defaults",
    "datasets",
    "evaluations",
    "methods",
    "search",
    "feature_maps",
)
_EXTRACTION_KEYS = tuple(ExtractionConfig.model_fields)
_RUNTIME_KEYS = tuple(RuntimeConfig.model_fields)
_DEFAULTS_KEYS = (*_EXTRACTION_KEYS, *_RUNTIME_KEYS)
_DATASET_KEYS = (
    *(k for k in DatasetConfig.model_fields if k not in ("name", "extraction", "runtime")),
    *_DEFAULTS_KEYS,
)
_EVALUATION_KEYS = (
    "dataset",
    "distractors",
    "methods",
    "schedule",
    "reproject_at_once",
    "description",
)
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


def _looks_like_path(weights: str) -> bool:
    """Whether a ``weights`` value names a file (else it is a keyword such as 'packaged')."""
    return (
        "/" in weights
        or os.sep in weights
        or weights.startswith(("~", ".", "$"))
        or weights.lower().endswith(_WEIGHT_FILE_SUFFIXES)
    )


def _weights_file(f: ConfigFile, raw: dict, entry: str) -> dict:
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


def _defaults(f: ConfigFile, value: Any) -> tuple[DatasetDefaults, dict[str, Any]]:
    """The ``defaults`` block, validated, and its flat keys (datasets override them)."""
    raw = f.renamed(
        f.mapping(value, "defaults", (*_DEFAULTS_KEYS, "n_classes")), "defaults", "defaults"
    )
    raw = _weights_file(f, raw, "defaults")
    try:
        return DatasetDefaults.model_validate(_split_settings(raw)), raw
    except ValidationError as exc:
        raise f.invalid(exc, "defaults", DatasetDefaults) from None


def _methods(f: ConfigFile, value: Any, entry: str) -> tuple[Method, ...]:
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


def _search(f: ConfigFile, value: Any) -> SearchParams:
    raw = f.renamed(f.mapping(value, "search", (*_SEARCH_KEYS, "n_classes")), "search", "search")
    try:
        return SearchParams.model_validate(raw)
    except ValidationError as exc:
        raise f.invalid(exc, "search", SearchParams) from None


def _feature_maps(f: ConfigFile, value: Any) -> FeatureMapsConfig:
    raw = f.mapping(value, "feature_maps", tuple(FeatureMapsConfig.model_fields))
    try:
        return FeatureMapsConfig.model_validate(raw)
    except ValidationError as exc:
        raise f.invalid(exc, "feature_maps", FeatureMapsConfig) from None


def _check_name(f: ConfigFile, name: Any, entry: str) -> None:
    """A dataset's or evaluation's name: lowercase letters, digits, '-' and '_'."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise f.error(
            entry,
            "invalid name: use lowercase letters, digits, '-' and '_', starting with a "
            "letter or digit",
        )


def _dataset(
    f: ConfigFile, name: Any, raw: Any, defaults: dict[str, Any], disable_missing: bool = False
) -> tuple[DatasetConfig, str | None]:
    """Parse one dataset; returns it and, for a missing optional one (any one with
    ``disable_missing``), why it is off."""
    entry = f"dataset {name!r}"
    _check_name(f, name, entry)
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
    if problem is not None and not (ds.optional or disable_missing):
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


def _check_demo(f: ConfigFile, ds: DatasetConfig, entry: str) -> None:
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


def _evaluation(
    f: ConfigFile, name: Any, raw: Any, methods: tuple[Method, ...]
) -> EvaluationConfig:
    entry = f"evaluation {name!r}"
    _check_name(f, name, entry)
    raw = dict(f.mapping(raw, entry, _EVALUATION_KEYS))
    raw["methods"] = _methods(f, raw["methods"], entry) if "methods" in raw else methods
    try:
        return EvaluationConfig.model_validate({"name": name, **raw})
    except ValidationError as exc:
        raise f.invalid(exc, entry, EvaluationConfig) from None


def _check_unique_identifiers(f: ConfigFile, items: Iterable[str], kind: str) -> None:
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


def _check_pca_source(f: ConfigFile, ds: DatasetConfig, datasets: dict[str, DatasetConfig]) -> None:
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
                f"objects ({', '.join(sorted(GROUPED_LAYOUTS))}), not {ds.layout!r}",
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
    f: ConfigFile, ev: EvaluationConfig, ds: DatasetConfig, datasets: dict[str, DatasetConfig]
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
    f: ConfigFile,
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
    f: ConfigFile,
    evaluations: dict[str, EvaluationConfig],
    datasets: dict[str, DatasetConfig],
    disabled: dict[str, str],
    search: SearchParams,
    isolate: bool = False,
) -> dict[str, str]:
    """Cross-entry checks of the evaluations; returns those disabled, with the reason
    (``isolate``: an evaluation that fails a check too, with its error)."""
    off: dict[str, str] = {}
    for name, ev in evaluations.items():
        off_parts = [d for d in (ev.dataset, *ev.distractors) if d in disabled]
        if isolate and off_parts:  # not checked against entries that did not load
            off[name] = f"uses disabled dataset(s) {', '.join(repr(d) for d in off_parts)}"
            continue
        try:
            problem = _check_evaluation(f, name, ev, datasets, disabled, search)
        except ConfigError as exc:
            if not isolate:
                raise
            problem = str(exc)
        if problem is not None:
            off[name] = problem
    return off


def _check_evaluation(
    f: ConfigFile,
    name: str,
    ev: EvaluationConfig,
    datasets: dict[str, DatasetConfig],
    disabled: dict[str, str],
    search: SearchParams,
) -> str | None:
    """Check one evaluation against the datasets (ConfigError); why it is disabled, or None."""
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
        return f"uses disabled dataset(s) {', '.join(repr(d) for d in off_parts)}"
    return None


def _load(f: ConfigFile, disable_missing: bool = False) -> ProjectConfig:
    top = f.mapping(f.read(), None, _TOP_KEYS)
    warehouse = f.location(top.get("warehouse", "warehouse"), "warehouse")
    reports = f.location(top.get("reports", "reports"), "reports")
    defaults, flat_defaults = _defaults(f, top.get("defaults"))
    methods = _methods(f, top.get("methods", list(DEFAULT_METHODS)), "methods")
    search = _search(f, top.get("search"))
    feature_maps = _feature_maps(f, top.get("feature_maps"))

    datasets: dict[str, DatasetConfig] = {}
    disabled: dict[str, str] = {}
    # disable_missing (the search server): a dataset or evaluation whose entry is invalid is
    # disabled with its error, like a missing folder, and the others load.
    isolate = disable_missing
    for name, raw in f.mapping(top.get("datasets"), "datasets", None).items():
        try:
            datasets[name], problem = _dataset(f, name, raw, flat_defaults, disable_missing)
        except ConfigError as exc:
            if not isolate or not isinstance(name, str):
                raise
            disabled[name] = str(exc)
            continue
        if problem is not None:
            why = "optional dataset" if datasets[name].optional else "dataset"
            disabled[name] = f"{problem} ({why} disabled)"
    _check_unique_identifiers(f, datasets, "dataset")
    for ds in datasets.values():
        if isolate and ds.pca_from in disabled and ds.pca_from not in datasets:
            continue  # disabled below, with its source
        try:
            _check_pca_source(f, ds, datasets)
        except ConfigError as exc:
            if not isolate:
                raise
            disabled[ds.name] = str(exc)
    _disable_pca_users(datasets, disabled)

    evaluations: dict[str, EvaluationConfig] = {}
    invalid_evals: dict[str, str] = {}
    for name, raw in f.mapping(top.get("evaluations"), "evaluations", None).items():
        try:
            evaluations[name] = _evaluation(f, name, raw, methods)
        except ConfigError as exc:
            if not isolate or not isinstance(name, str):
                raise
            invalid_evals[name] = str(exc)
    for name, ds in datasets.items():
        if ds.has_groundtruth and name not in disabled and name not in evaluations:
            evaluations[name] = EvaluationConfig(
                name=name, dataset=name, methods=methods, implicit=True
            )
    _check_unique_identifiers(f, evaluations, "evaluation")
    disabled_evals = _check_evaluations(f, evaluations, datasets, disabled, search, isolate)
    disabled_evals.update(invalid_evals)

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
        feature_maps=feature_maps,
    )


def _open(path: Path | str | None) -> ConfigFile:
    """The datasets YAML at ``path`` (default: :func:`default_config_path`), not yet read."""
    source = Path(path) if path is not None else default_config_path()
    return ConfigFile(source, renames=_RENAMED, missing=_MISSING)


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
    f = _open(path)
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


def load_config(path: Path | str | None = None, disable_missing: bool = False) -> ProjectConfig:
    """Load and validate a ``datasets.yaml`` (default: :func:`default_config_path`).

    ``disable_missing``: a dataset whose folders are missing is disabled, with the reason in
    ``disabled_datasets`` (as an ``optional`` one always is), instead of failing the whole
    file: readers that serve every dataset (the search server) keep serving the others.

    Raises:
        ConfigError: anything invalid; the message names the file and the entry.
    """
    return _load(_open(path), disable_missing)
