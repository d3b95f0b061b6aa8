"""Manifest shards: per image, its id, relative path, bytes, mtime, sha1, width and height.

``build_manifest`` reuses sha1 and size from the previous manifest when a file's size and
mtime match, so a rescan hashes only new or changed files; files that cannot be read as
images keep a row with their ``error`` (they get no features). ``manifest_rows`` (and
``evaluation_manifest_rows``, over an evaluation's dataset and distractor sets) read the
readable rows back: image id → path and sha1.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from cw_pipeline.compute.shards import FileStat
from cw_pipeline.config import DatasetConfig, EvaluationConfig, ProjectConfig
from cw_pipeline.core import images as imgs
from cw_pipeline.core.datasets import (
    image_path,
    shown_name,
)
from cw_pipeline.store import FeatureStore, manifest_path

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("relpath", pa.string()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("sha1", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("error", pa.string()),
    ]
)


def sha1_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-1 of a regular file (anything else is refused before it is opened)."""
    h = hashlib.sha1()
    with imgs.open_regular_file(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _manifest_row(
    f: FileStat, sha1: str | None, error: str | None, size: tuple[int, int] = (-1, -1)
) -> dict:
    return {
        "image_id": shown_name(f.image_id),
        "relpath": shown_name(f.relpath),
        "bytes": f.size,
        "mtime_ns": f.mtime_ns,
        "sha1": sha1,
        "width": size[0],
        "height": size[1],
        "error": error,
    }


def build_manifest(
    ds: DatasetConfig, files: Sequence[FileStat], previous: pa.Table | None = None
) -> tuple[pa.Table, int]:
    """Manifest rows of a shard; returns the table and how many files were hashed.

    A file that cannot be indexed gets a row with its ``error`` (the features step puts it in
    the rejected table) and the rest proceed: one refused by the scan (``FileStat.error``,
    never opened), one that vanished or became unreadable since the scan, one whose header
    does not parse. Only regular files are opened.
    """
    prev: dict[str, dict] = {}
    if previous is not None and previous.num_rows:
        for row in previous.to_pylist():
            prev[row["relpath"]] = row
    rows, hashed = [], 0
    for f in files:
        if f.error is not None:
            rows.append(_manifest_row(f, None, f.error))
            continue
        old = prev.get(f.relpath)
        if old and old["sha1"] and old["bytes"] == f.size and old["mtime_ns"] == f.mtime_ns:
            rows.append({**old, "image_id": f.image_id})
            continue
        path = image_path(ds.images, f.relpath)
        hashed += 1
        try:
            sha1 = sha1_file(path)
        except FileNotFoundError as exc:
            why = os.strerror(exc.errno or errno.ENOENT)
            error = f"cannot load image '{path}': it vanished after the scan ({why})"
            rows.append(_manifest_row(f, None, error))
            continue
        except (OSError, ValueError) as exc:  # ImageLoadError names the file
            rows.append(_manifest_row(f, None, str(exc)))
            continue
        error, width, height = None, -1, -1
        try:
            width, height = imgs.image_size(path)
        except Exception as exc:  # recorded; the features step quarantines it
            error = str(exc)
        rows.append(_manifest_row(f, sha1, error, (width, height)))
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), hashed


def manifest_paths(
    store: FeatureStore, ds: DatasetConfig, shards: Sequence[str]
) -> dict[str, Path]:
    """image id → absolute path, from the stored manifests of the given shards.

    Rows with an ``error`` (quarantined files, which have no features) are left out: their
    names may be no valid relative path (a backslash, say)."""
    return {i: path for i, (path, _) in manifest_rows(store, ds, shards).items()}


def manifest_rows(
    store: FeatureStore, ds: DatasetConfig, shards: Sequence[str]
) -> dict[str, tuple[Path, str]]:
    """image id → (absolute path, sha1) of the readable rows of the given shards' manifests
    (as :func:`manifest_paths`)."""
    out: dict[str, tuple[Path, str]] = {}
    for shard in shards:
        rel = manifest_path(ds.name, shard)
        for row in store.read_table(rel, ["image_id", "relpath", "sha1", "error"]).to_pylist():
            if not row["error"]:
                out[row["image_id"]] = (image_path(ds.images, row["relpath"]), row["sha1"])
    return out


def evaluation_manifest_rows(
    config: ProjectConfig,
    store: FeatureStore,
    ev: EvaluationConfig,
    shards: dict[str, list[str]],
) -> dict[str, tuple[Path, str]]:
    """image id → (absolute path, sha1) of the readable images of an evaluation: those of
    the current ``shards`` of its dataset and of each of its distractor sets (as
    :func:`manifest_rows`)."""
    rows = manifest_rows(store, config.dataset(ev.dataset), shards[ev.dataset])
    for dname in ev.distractors:
        rows.update(manifest_rows(store, config.dataset(dname), shards.get(dname, [])))
    return rows
