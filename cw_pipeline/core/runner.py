"""Evaluate methods end to end on an image folder with a known layout (used by ``cw-pipeline
evaluate``): extract features once, learn PCA on a separate training set, search, score."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cw_pipeline.core import allocator
from cw_pipeline.core.aggregation import PCAWhitening
from cw_pipeline.core.datasets import (
    GroundTruth,
    QueryProtocol,
    holidays_groundtruth,
    load_gnd_pickle,
    read_oxford_groundtruth,
    scan_image_folder,
    ukbench_groundtruth,
    validate_groundtruth,
)
from cw_pipeline.core.datasets.layouts import EVALUATE_LAYOUTS, FLAT_ID_LAYOUTS, GROUPED_LAYOUTS
from cw_pipeline.core.evaluation import score
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.images import load_image
from cw_pipeline.core.methods import Method, fit_pca, offline_descriptors
from cw_pipeline.core.pca_split import group_labels
from cw_pipeline.core.ranking import Ranking
from cw_pipeline.core.retrieval import InMemoryMaps, search
from cw_pipeline.core.search_settings import SearchParams

logger = logging.getLogger(__name__)


@dataclass
class Benchmark:
    """A database of images with ground truth, ready to evaluate."""

    name: str
    root: Path
    ids: list[str]
    paths: list[Path]
    groundtruth: GroundTruth
    labels: np.ndarray | None = None  # object/group label per image (grouped layouts)

    @property
    def grouped(self) -> bool:
        return self.labels is not None


def load_benchmark(layout: str, images: Path, groundtruth: Path | None = None) -> Benchmark:
    """Read an image folder and its ground truth; fails early with a message naming the path."""
    images = Path(images)
    if layout not in EVALUATE_LAYOUTS:
        raise ValueError(
            f"unknown layout {layout!r}; expected one of {', '.join(EVALUATE_LAYOUTS)}"
        )
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")
    found = scan_image_folder(images, flat=layout in FLAT_ID_LAYOUTS)
    if not found:
        raise ValueError(f"no images found under {images}")
    rel = dict(found)
    if layout in GROUPED_LAYOUTS:
        ids = [i for i, _ in found]
        gt = grouped_groundtruth(layout, ids)
        labels = group_labels(layout, ids)
        return Benchmark(layout, images, ids, [images / rel[i] for i in ids], gt, labels)
    if groundtruth is None:
        raise ValueError(f"layout {layout!r} needs --groundtruth (a folder or a gnd_*.pkl)")
    groundtruth = Path(groundtruth)
    if layout == "gnd" or groundtruth.suffix == ".pkl":
        gt = load_gnd_pickle(groundtruth)
        missing = [i for i in gt.image_ids if i not in rel]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images of {groundtruth.name} are missing under {images}, "
                f"e.g. {missing[0]}"
            )
        ids = list(gt.image_ids)
    else:
        ids = sorted(rel)
        gt = read_oxford_groundtruth(groundtruth, image_ids=ids, dataset=layout)
        problems = validate_groundtruth(gt, ids)
        if problems:  # as the pipeline: missing positives would inflate the AP
            raise FileNotFoundError(
                f"the ground truth {groundtruth} names images missing under {images}: "
                + "; ".join(problems)
            )
    return Benchmark(layout, images, ids, [images / rel[i] for i in ids], gt)


def grouped_groundtruth(layout: str, ids: Sequence[str]) -> GroundTruth:
    """Ground truth of a grouped layout (ukbench, holidays) over the images ``ids``."""
    if layout == "ukbench":
        return ukbench_groundtruth(ids)
    if layout == "holidays":
        return holidays_groundtruth(ids)
    raise ValueError(f"layout {layout!r} has no object groups")


def extract_features(
    extractor: FeatureExtractor,
    ids: Sequence[str],
    paths: Sequence[Path],
    progress: Callable[[int, int], None] | None = None,
) -> FeatureSet:
    """Features of a list of files (decode overlapped with the forward pass)."""
    records = {}
    for n, (key, rec) in enumerate(extractor.extract_files(zip(ids, paths, strict=True)), 1):
        records[key] = rec
        if progress is not None:
            progress(n, len(ids))
    allocator.release()  # the forward passes are over: what they kept goes back
    return FeatureSet.from_records(list(ids), [records[i] for i in ids])


def extract_queries(
    extractor: FeatureExtractor, bench: Benchmark, protocol: QueryProtocol
) -> FeatureSet:
    """Features of the queries of a benchmark with boxes (Oxford/Paris style)."""
    index = {i: p for i, p in zip(bench.ids, bench.paths, strict=True)}
    recs = []
    for q in bench.groundtruth.queries:
        path = index.get(q.image_id) or _find_query_image(bench.root, q.image_id)
        recs.append(extractor.extract_query(load_image(path), q.bbox, protocol))
    return FeatureSet.from_records([q.image_id for q in bench.groundtruth.queries], recs)


def _find_query_image(root: Path, image_id: str) -> Path:
    for ext in (".jpg", ".jpeg", ".png", ".JPG"):
        hits = list(root.rglob(f"{image_id}{ext}"))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"query image {image_id!r} not found under {root}")


@dataclass
class MethodScore:
    """Scores of one method on one database."""

    method: str
    map: float
    ns_score: float | None = None
    revisited: dict[str, float] | None = None
    aps: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "map": round(self.map, 4)}
        if self.ns_score is not None:
            out["ns_score"] = round(self.ns_score, 4)
        if self.revisited is not None:
            out["revisited"] = {k: round(v, 4) for k, v in self.revisited.items()}
        out["seconds"] = round(self.seconds, 2)
        return out


def evaluate_methods(
    methods: Sequence[Method],
    database: FeatureSet,
    queries: FeatureSet | None,
    train: FeatureSet,
    params: SearchParams,
    extractor: FeatureExtractor,
    *,
    groundtruth: GroundTruth,
    pca_metadata: dict[str, Any] | None = None,
) -> list[MethodScore]:
    """Score each method; PCA is always fitted on ``train``, never on the evaluated images.

    ``queries`` None: the ground truth's queries are database images (grouped layouts), and
    their descriptors are the database's rows, as in the pipeline.
    """
    bb = extractor.backbone
    meta = {"backbone": bb.name, "layer": bb.layer, **(pca_metadata or {})}
    classifier = (bb.classifier_weight, bb.classifier_bias)
    pos = {i: k for k, i in enumerate(database.ids)}
    rows = None
    if queries is None:
        rows = np.array([pos[q.image_id] for q in groundtruth.queries], dtype=np.int64)
    query_ids = queries.ids if queries is not None else [database.ids[i] for i in rows]  # type: ignore[union-attr]
    out = []
    for method in methods:
        t0 = time.perf_counter()
        pca = fit_pca(method, train, params, metadata=meta)
        res = evaluate_search(method, database, queries, pca, params, classifier, rows)
        s = score(res.indices, groundtruth, database.ids, query_ids)
        out.append(
            MethodScore(
                method.name,
                s.map,
                ns_score=s.ns_score,
                revisited=s.revisited,
                aps=list(s.aps.values()),
                seconds=time.perf_counter() - t0,
            )
        )
    return out


def evaluate_search(
    method: Method,
    database: FeatureSet,
    queries: FeatureSet | None,
    pca: PCAWhitening | None,
    params: SearchParams,
    classifier: tuple[torch.Tensor, torch.Tensor] | None = None,
    query_rows: np.ndarray | None = None,
) -> Ranking:
    """Full rankings of feature sets held in memory, by :func:`core.retrieval.search`.

    ``queries`` None: the database images ``query_rows`` (default: all) query, with their
    database descriptors (as the pipeline does). OnA and re-ranking need the database's maps
    and the ``classifier`` (weight, bias).
    """
    maps = None
    if database.maps is not None and classifier is not None:
        maps = InMemoryMaps(database.maps, *classifier)
    elif method.needs_maps:
        raise ValueError(f"method {method.name!r} needs stored feature maps and the classifier")
    db = offline_descriptors(method, database, pca, params)
    qd = None
    if queries is None:
        rows = np.arange(len(database)) if query_rows is None else np.asarray(query_rows)
        queries, qd = database.subset(rows), db[rows]
    return search(method, queries, db, pca, maps, params, query_descriptors=qd)
