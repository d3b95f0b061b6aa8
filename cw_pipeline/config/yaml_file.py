"""The generic half of loading the datasets YAML: a strict YAML reader (repeated keys are
errors), the line of every key, ``${VAR}`` / ``~`` expansion and path resolution against the
file's folder, and :class:`ConfigError`, whose message names the file, the line and the entry
(``datasets.yaml:12: dataset 'oxford5k': unknown layout 'oxfrod' (...)``). What the entries
mean is :mod:`cw_pipeline.config.models` and :mod:`cw_pipeline.config.load`."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cw_pipeline.core.datasets import TextDecodeError, decode_text
from cw_pipeline.core.validation import error_key, error_message

logger = logging.getLogger("cw_pipeline.config")

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


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass
class ConfigFile:
    """A YAML file being loaded: where it is, the line of each key, the warnings so far;
    ``renames`` (per kind of entry, old key -> new name and meaning) and ``missing`` (key ->
    message when a required key is absent) word the errors of this kind of file."""

    source: Path
    renames: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    missing: Mapping[str, str] = field(default_factory=dict)
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
        if err["type"] == "missing" and key in self.missing:
            return self.error(entry, self.missing[key], key)
        if err["type"] in ("dict_type", "model_type"):
            got = type(err.get("input")).__name__
            return self.error(entry, f"expected a mapping, got {got}", key)
        allowed = fields_at(model, err["loc"])
        return self.error(entry, error_message(err, allowed, {"generate": "generator"}), key)

    def warn(self, message: str) -> None:
        text = f"{self.source}: {message}"
        logger.warning(text)
        self.warnings.append(text)

    def read(self) -> Any:
        """The parsed YAML document (not yet validated); records the line of every key."""
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
        self.lines = key_lines(text)
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
        for old, new in self.renames.get(kind, {}).items():
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


def fields_at(model: type[BaseModel], loc: tuple) -> tuple[str, ...]:
    """The field names of the (nested) model that an error location points into."""
    for part in loc[:-1]:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        sub = getattr(info, "annotation", None)
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            break
        model = sub
    return tuple(model.model_fields)


def key_lines(text: str) -> dict[tuple[str | None, str | None], int]:
    """The line of every top-level key, dataset and evaluation entry, and of the keys inside
    them, under the ``(entry, key)`` that :meth:`ConfigFile.error` looks up."""
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
