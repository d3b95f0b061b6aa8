"""Query features: the ground truth of a dataset and the features of its query regions.

Also the data version of ``<ds>/query_features``, which depends on the ground truth and the
query images only, so changing other images leaves the query features as they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from cw_pipeline.compute.features import records_to_table
from cw_pipeline.config import DatasetConfig
from cw_pipeline.core.datasets import (
    GroundTruth,
    Query,
    holidays_groundtruth,
    image_path,
    load_gnd_pickle,
    read_oxford_groundtruth,
    ukbench_groundtruth,
)
from cw_pipeline.core.datasets.layouts import GT_FILE_LAYOUTS, GT_FOLDER_LAYOUTS
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.core.images import load_image
from cw_pipeline.store import (
    FeatureStore,
    manifest_path,
)

QUERY_EXTRA = [("bbox", pa.list_(pa.float32(), 4)), ("query_name", pa.string())]


def load_groundtruth(ds: DatasetConfig, image_ids: Sequence[str]) -> GroundTruth:
    """Ground truth of a dataset for the given database ids."""
    if ds.layout in GT_FOLDER_LAYOUTS:
        return read_oxford_groundtruth(ds.groundtruth, image_ids=list(image_ids), dataset=ds.name)  # type: ignore[arg-type]
    if ds.layout in GT_FILE_LAYOUTS:
        return load_gnd_pickle(ds.groundtruth)  # type: ignore[arg-type]
    if ds.layout == "ukbench":
        return ukbench_groundtruth(list(image_ids))
    if ds.layout == "holidays":
        return holidays_groundtruth(list(image_ids))
    raise ValueError(f"dataset {ds.name!r} (layout {ds.layout}) has no ground truth")


def check_groundtruth_images(ds: DatasetConfig, gt: GroundTruth, available: Sequence[str]) -> None:
    """Fail fast (ValueError naming the ground-truth file, the count and the first ids) when
    the ground truth names images — database, query, positive or junk — that are not files of
    the dataset's folder."""
    have = set(available)
    named = set(gt.image_ids)
    for q in gt.queries:
        named |= {q.image_id} | q.positives | q.junk
    missing = sorted(named - have)
    if missing:
        shown = ", ".join(repr(i) for i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ValueError(
            f"{ds.groundtruth}: the ground truth of dataset {ds.name!r} names {len(missing)} "
            f"image(s) that are not in {ds.images}: {shown}{more}"
        )


def query_box(
    ds: DatasetConfig, query: Query, width: int, height: int
) -> tuple[float, float, float, float] | None:
    """A query's box clipped to its ``width``×``height`` image (None: the whole image).

    A box that is not finite, has zero area or lies entirely outside the image is an error
    naming the ground-truth file, the query, its image and the box; a box reaching past the
    border is clipped to it.
    """
    box = query.bbox
    if box is None:
        return None
    label = f"{ds.groundtruth}: query {query.name or query.image_id!r} (image {query.image_id!r}"
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite((x1, y1, x2, y2))) or x2 <= x1 or y2 <= y1:
        raise ValueError(f"{label}): box {tuple(box)} has zero area or is inverted")
    cx1, cy1 = max(0.0, x1), max(0.0, y1)
    cx2, cy2 = min(float(width), x2), min(float(height), y2)
    if cx2 <= cx1 or cy2 <= cy1:
        raise ValueError(f"{label}, {width}x{height} px): box {tuple(box)} lies outside the image")
    return (cx1, cy1, cx2, cy2)


def compute_query_features(
    ds: DatasetConfig,
    manifest: pa.Table,
    extractor: FeatureExtractor,
) -> pa.Table:
    """Features of a box-query dataset's queries (crop or paper protocol).

    The ground truth is checked against the manifest first (missing images, unreadable query
    images, empty or outside boxes fail naming the file and query) before any forward pass.
    """
    ids = manifest.column("image_id").to_pylist()
    gt = load_groundtruth(ds, ids)
    check_groundtruth_images(ds, gt, ids)
    rows = {
        r["image_id"]: r
        for r in manifest.select(["image_id", "relpath", "width", "height", "error"]).to_pylist()
    }
    plan = []
    for q in gt.queries:
        row = rows[q.image_id]
        if row["error"]:
            raise ValueError(
                f"{ds.groundtruth}: query {q.name or q.image_id!r}: its image {q.image_id!r} "
                f"cannot be read: {row['error']}"
            )
        plan.append((q, row["relpath"], query_box(ds, q, row["width"], row["height"])))
    recs, qids, boxes, names = [], [], [], []
    for q, relpath, box in plan:
        try:
            img = load_image(image_path(ds.images, relpath))
            recs.append(extractor.extract_query(img, box, ds.query_protocol))
        except ValueError as exc:  # ImageLoadError, or a box smaller than the network stride
            raise ValueError(f"{ds.groundtruth}: query {q.name or q.image_id!r}: {exc}") from exc
        qids.append(q.image_id)
        boxes.append(list(q.bbox) if q.bbox is not None else [np.nan] * 4)
        names.append(q.name or q.image_id)
    table = records_to_table(qids, [""] * len(qids), recs)
    table = table.append_column("bbox", pa.array(boxes, pa.list_(pa.float32(), 4)))
    return table.append_column("query_name", pa.array(names, pa.string()))


def _groundtruth_bytes(ds: DatasetConfig) -> bytes:
    """The ground truth's files, concatenated with their names (for its version)."""
    root = Path(str(ds.groundtruth))
    if root.is_file():
        return root.read_bytes()
    out = []
    for p in sorted(root.rglob("*")) if root.is_dir() else []:
        if p.is_file():
            out.append(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return b"\n".join(out)


def query_input_version(
    store: FeatureStore, ds: DatasetConfig, shards: Sequence[str], code_version: str
) -> str | None:
    """What ``<ds>/query_features`` depends on: the ground truth's files, the sha1 of each
    query's image, the extraction settings and the query protocol — not the other images, so
    adding or changing a non-query image leaves the query features as they are.

    None while a manifest shard is missing. A ground truth that cannot be read still gets a
    version (with its error), so the asset runs and fails with that error.
    """
    rows: dict[str, str] = {}
    for shard in shards:
        rel = manifest_path(ds.name, shard)
        if not store.exists(rel):
            return None
        t = store.read_table(rel, ["image_id", "sha1"])
        rows.update(
            zip(t.column("image_id").to_pylist(), t.column("sha1").to_pylist(), strict=True)
        )
    h = hashlib.sha1(f"{code_version}\0{ds.query_protocol}\0".encode())
    h.update(hashlib.sha1(_groundtruth_bytes(ds)).digest())
    try:
        gt = load_groundtruth(ds, sorted(rows))
        for q in gt.queries:
            h.update(f"{q.image_id}\0{rows.get(q.image_id, 'missing')}\n".encode())
    except (OSError, ValueError) as exc:
        h.update(f"error\0{exc}".encode())
    return h.hexdigest()[:16]
