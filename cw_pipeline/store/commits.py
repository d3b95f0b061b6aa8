"""Commit points: the artefacts of one step become visible together, or not at all.

A step that writes several files readers use together (a dataset's PCA models; its
descriptor tables, which were projected with one PCA; an evaluation's ranking tables) writes
them into a new **generation** folder that no reader knows of yet, then switches one small
**pointer** file, ``commits/<owner>/<unit>.json``, in a single atomic write (a rename on a
local disk, one PUT on an object store). A reader reads the pointer once and opens the files
it names, so it sees the old generation or the new one, never a mix; the files of a
generation are never rewritten.

A pointer may *refer* to a generation of another unit of the same owner: a dataset's
``index`` (its descriptors) names the ``pca`` generation they were projected with, so a
reader of the index gets that PCA even after a newer one is published. A pointer may also
keep the state it replaced readable (``previous``, published with ``keep_previous``): a
dataset's previous index stays searchable with the distractor descriptors projected with
its PCA until they are re-projected.

Old generations are removed by the writer that publishes, once they are neither current nor
referred to, and were retired (or, never published, created) more than
:func:`grace_seconds` ago (default 15 minutes, ``$CW_PIPELINE_GENERATION_GRACE``). A reader
that opened a generation has that long to finish reading it; the server and
``cw-pipeline search`` read a database into memory in seconds and keep it until they reload,
so a reader never sees a file vanish under it. A writer's generation must be published within
the grace period too (its files are written first, then the pointer).

This module knows nothing of what the files are; :mod:`cw_pipeline.store.layout` names the
folders (:func:`~cw_pipeline.store.layout.commit_path`,
:func:`~cw_pipeline.store.layout.generation_folder`).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cw_pipeline.store.feature_store import CorruptFileError, FeatureStore
from cw_pipeline.store.layout import (
    COMMIT_UNITS,
    commit_path,
    generation_folder,
    generations_folder,
)

__all__ = [
    "Commit",
    "grace_seconds",
    "new_generation",
    "publish",
    "read_commit",
]

#: How long a retired generation stays readable, unless ``$CW_PIPELINE_GENERATION_GRACE``.
DEFAULT_GRACE_SECONDS = 900.0
GRACE_VARIABLE = "CW_PIPELINE_GENERATION_GRACE"
_GENERATION_RE = re.compile(r"(\d{8}T\d{6}\.\d{6}Z)-[0-9a-f]{8}")
_FORMAT = "%Y%m%dT%H%M%S.%fZ"


def grace_seconds() -> float:
    """Seconds a retired generation stays readable (``$CW_PIPELINE_GENERATION_GRACE``)."""
    text = os.environ.get(GRACE_VARIABLE, "").strip()
    if not text:
        return DEFAULT_GRACE_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{GRACE_VARIABLE}={text!r} is not a number of seconds") from None
    if not value >= 0:
        raise ValueError(f"{GRACE_VARIABLE}={text!r} must be a number of seconds ≥ 0")
    return value


def new_generation() -> str:
    """A new generation name: its UTC creation time (sortable) and 8 random hex digits."""
    now = dt.datetime.now(dt.UTC).strftime(_FORMAT)
    return f"{now}-{uuid.uuid4().hex[:8]}"


def generation_time(generation: str) -> float | None:
    """When ``generation`` was created (epoch seconds); None for a name not made here."""
    m = _GENERATION_RE.fullmatch(generation)
    if m is None:
        return None
    return dt.datetime.strptime(m.group(1), _FORMAT).replace(tzinfo=dt.UTC).timestamp()


@dataclass(frozen=True)
class Commit:
    """One published state of a unit (``pca``, ``index``, ``rankings``) of an owner (a
    dataset or an evaluation): its generation, its files by role, the generations of other
    units it was built from (``refs``), free metadata, and when earlier generations were
    retired (``retired``: ``"<unit>/<generation>"`` -> epoch seconds)."""

    owner_kind: str
    owner: str
    unit: str
    generation: str
    files: Mapping[str, str]
    refs: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    retired: Mapping[str, float] = field(default_factory=dict)
    previous: Commit | None = None

    def file(self, role: str) -> str:
        """The store path of ``role`` (KeyError naming the roles it has)."""
        try:
            return self.files[role]
        except KeyError:
            raise KeyError(
                f"{self.unit} generation {self.generation} of {self.owner_kind} {self.owner!r} "
                f"has no {role!r} (it has: {', '.join(sorted(self.files)) or 'nothing'})"
            ) from None

    def as_json(self) -> dict[str, Any]:
        out = {
            "generation": self.generation,
            "files": dict(self.files),
            "refs": dict(self.refs),
            "meta": dict(self.meta),
            "retired": dict(self.retired),
        }
        if self.previous is not None:
            out["previous"] = {
                k: v
                for k, v in self.previous.as_json().items()
                if k in ("generation", "files", "refs", "meta")
            }
        return out


def read_commit(store: FeatureStore, owner_kind: str, owner: str, unit: str) -> Commit | None:
    """The current commit of ``unit`` of ``owner`` (None: never published).

    Raises:
        CorruptFileError: the pointer does not parse or lacks a field (names it).
    """
    rel = commit_path(owner_kind, owner, unit)
    try:
        data = store.read_json(rel)
    except FileNotFoundError:
        return None
    try:
        return _commit(owner_kind, owner, unit, data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptFileError(rel, f"not a commit pointer ({exc!r})", store.url(rel)) from None


def _commit(owner_kind: str, owner: str, unit: str, data: Mapping[str, Any]) -> Commit:
    previous = data.get("previous")
    return Commit(
        owner_kind,
        owner,
        unit,
        str(data["generation"]),
        {str(k): str(v) for k, v in dict(data["files"]).items()},
        {str(k): str(v) for k, v in dict(data.get("refs") or {}).items()},
        dict(data.get("meta") or {}),
        {str(k): float(v) for k, v in dict(data.get("retired") or {}).items()},
        None if previous is None else _commit(owner_kind, owner, unit, previous),
    )


def publish(
    store: FeatureStore,
    owner_kind: str,
    owner: str,
    unit: str,
    generation: str,
    files: Mapping[str, str],
    *,
    refs: Mapping[str, str] | None = None,
    meta: Mapping[str, Any] | None = None,
    keep_previous: bool = False,
) -> Commit:
    """Make ``generation`` (whose ``files`` are written) the current one of ``unit``, in one
    atomic write of its pointer, then remove the owner's generations past their grace period.
    ``keep_previous``: the commit it replaces stays readable (as ``previous``) until the next.
    """
    if unit not in COMMIT_UNITS:
        raise ValueError(f"unknown commit unit {unit!r} (known: {', '.join(COMMIT_UNITS)})")
    now = time.time()
    grace = grace_seconds()
    old = read_commit(store, owner_kind, owner, unit)
    retired = dict(old.retired) if old else {}
    if old is not None:
        for key in _generations_of(old):
            retired.setdefault(key, now)
    refs = dict(refs or {})
    current = {f"{unit}/{generation}", *(f"{u}/{g}" for u, g in refs.items())}
    previous = None
    if keep_previous and old is not None and old.generation != generation:
        previous = Commit(owner_kind, owner, unit, old.generation, old.files, old.refs, old.meta)
        current |= _generations_of(previous)
    for key in current:
        retired.pop(key, None)
    commit = Commit(
        owner_kind,
        owner,
        unit,
        generation,
        dict(files),
        refs,
        dict(meta or {}),
        {k: t for k, t in retired.items() if t > now - grace},  # older ones may go now
        previous,
    )
    store.write_json(commit_path(owner_kind, owner, unit), commit.as_json())
    remove_expired(store, owner_kind, owner, now=now, grace=grace)
    return commit


def _generations_of(commit: Commit) -> set[str]:
    """The generations a commit keeps in use: its own, those it refers to, and its
    ``previous``'s."""
    out = {f"{commit.unit}/{commit.generation}", *(f"{u}/{g}" for u, g in commit.refs.items())}
    return out if commit.previous is None else out | _generations_of(commit.previous)


def remove_expired(
    store: FeatureStore,
    owner_kind: str,
    owner: str,
    *,
    now: float | None = None,
    grace: float | None = None,
) -> list[str]:
    """Delete the generation folders of ``owner`` that no current pointer names and that were
    retired (or, never published, created) over ``grace`` seconds ago; returns them."""
    now = time.time() if now is None else now
    grace = grace_seconds() if grace is None else grace
    in_use: set[str] = set()
    retired: dict[str, float] = {}
    for unit in COMMIT_UNITS:
        commit = read_commit(store, owner_kind, owner, unit)
        if commit is None:
            continue
        in_use |= _generations_of(commit)
        for key, t in commit.retired.items():
            retired[key] = max(t, retired.get(key, t))
    removed = []
    for unit in COMMIT_UNITS:
        folder = generations_folder(unit, owner_kind, owner)
        if folder is None:
            continue
        for generation in _listed_generations(store, folder):
            key = f"{unit}/{generation}"
            since = retired.get(key, generation_time(generation))
            if key in in_use or since is None or since > now - grace:
                continue
            if store.delete(generation_folder(unit, owner_kind, owner, generation), recursive=True):
                removed.append(key)
    return removed


def _listed_generations(store: FeatureStore, folder: str) -> list[str]:
    """Generation names with a folder under ``folder`` (``generation=<name>/...``)."""
    names = set()
    prefix = f"{folder}/generation="
    for rel in store.list(folder, suffix=None):
        if rel.startswith(prefix):
            names.add(rel[len(prefix) :].split("/", 1)[0])
    return sorted(names)
