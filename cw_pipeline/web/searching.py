"""One search of the search page: the query (an indexed image or an upload) ranked by
:func:`cw_pipeline.query.search_image`, the function of ``cw-pipeline search``, and its answer
(results with ground-truth labels and AP, the query's classes, timings, Dagster links)."""

from __future__ import annotations

import math
import os
import secrets
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from PIL import Image

from cw_pipeline.config import DatasetConfig
from cw_pipeline.core.datasets import Query
from cw_pipeline.core.evaluation import average_precision_at
from cw_pipeline.core.extract import FeatureExtractor, ImageFeatures
from cw_pipeline.core.images import ImageLoadError, load_image
from cw_pipeline.core.methods import Method
from cw_pipeline.core.ranking import FullOrder
from cw_pipeline.query import (
    Hit,
    QueryError,
    QueryResult,
    load_query_image,
    search_image,
)
from cw_pipeline.web.common import (
    DEFAULT_TOP,
    MAX_EXPANSION,
    MAX_TOP,
    QUERY_CACHE,
    KeptQuery,
    LoadedIndex,
    Target,
    WebError,
    image_url,
    imagenet_categories,
    upload_too_large,
)


class SearchMixin:
    """How :class:`~cw_pipeline.web.engine.SearchEngine` searches and answers."""

    # ------------------------------------------------------------------ search
    def answer_search(
        self,
        target: Target,
        *,
        method: str = "ofa",
        top: int = DEFAULT_TOP,
        box: tuple[float, float, float, float] | None = None,
        protocol: str | None = None,
        image_id: str | None = None,
        image_dataset: str | None = None,
        query_name: str | None = None,
        upload: bytes | None = None,
        upload_name: str = "upload",
    ) -> dict[str, Any]:
        """Rank the target's database for an indexed image (by id) or an uploaded one."""
        t0 = time.perf_counter()
        try:
            m = Method.parse(method)
        except ValueError as exc:
            raise WebError(400, str(exc)) from exc
        if not 1 <= top <= MAX_TOP:
            raise WebError(400, f"top must be between 1 and {MAX_TOP}, got {top}")
        if (image_id is None) == (upload is None):
            raise WebError(400, "give an image: id=ID of an indexed image, or upload one")
        if max(m.qe, m.rerank) > MAX_EXPANSION:
            raise WebError(
                400,
                f"method {method!r}: +qe and +r go up to {MAX_EXPANSION} (and the database's size)",
            )
        main = self._main_dataset(target)
        pool = self.extractors(main)
        loads_network = not pool.loaded
        t_queue = time.perf_counter()
        with self.search_slot(), pool.get() as extractor:
            queued = time.perf_counter() - t_queue
            model_seconds = pool.load_seconds if loads_network else 0.0
            return self._search(
                t0, queued, model_seconds, target, main, m, extractor, top, box, protocol,
                image_id, image_dataset, query_name, upload, upload_name,
            )  # fmt: skip

    def _search(
        self,
        t0: float,
        queued: float,
        model_seconds: float,
        target: Target,
        main: DatasetConfig,
        m: Method,
        extractor: FeatureExtractor,
        top: int,
        box: tuple[float, float, float, float] | None,
        protocol: str | None,
        image_id: str | None,
        image_dataset: str | None,
        query_name: str | None,
        upload: bytes | None,
        upload_name: str,
    ) -> dict[str, Any]:
        """:meth:`search` in a search slot, with an extractor of its own."""
        image, name, query, gt_query = self._query_image(
            target, main, image_id, image_dataset, query_name, upload, upload_name, extractor
        )
        loaded, result, token, index_seconds = self._rank(
            target, main, m, extractor, image, name, box, top, protocol, gt_query is not None
        )
        index = loaded.index
        self.metrics.record_search(
            m, result.timings["features"], result.timings["ranking"], result.map_forward_passes
        )
        labels: dict[int, str] = {}
        ap = None
        if gt_query is not None:
            assert result.order is not None
            labels, ap, n_pos = self._labels(loaded, gt_query, result.order)
            query.update(query=gt_query.name or gt_query.image_id, positives=n_pos)
        query.update(
            box=None if result.box is None else list(result.box),
            protocol=result.protocol,
            classes=_query_classes(extractor, result.record),
        )
        hits = self._hits(target, loaded, result.hits, None if gt_query is None else labels)
        total = time.perf_counter() - t0
        return {
            "target": target.as_dict(),
            "query": query,
            "method": result.method,
            "database": len(index),
            "descriptors": index.described(m),
            "ap": None if ap is None else round(ap, 6),
            "results": hits,
            "map_forward_passes": result.map_forward_passes,
            "token": token,
            "timings_ms": {
                "features": round(1000 * result.timings["features"], 1),
                "ranking": round(1000 * result.timings["ranking"], 1),
                "index_load": round(1000 * index_seconds, 1),
                "model_load": round(1000 * model_seconds, 1),
                "queued": round(1000 * queued, 1),
                "server": round(1000 * total, 1),
            },
        }

    def _rank(
        self,
        target: Target,
        main: DatasetConfig,
        m: Method,
        extractor: FeatureExtractor,
        image: Image.Image,
        name: Path,
        box: tuple[float, float, float, float] | None,
        top: int,
        protocol: str | None,
        full_ranking: bool,
    ) -> tuple[LoadedIndex, QueryResult, str, float]:
        """Rank the target's database (loaded if needed) with :func:`search_image` and keep the
        query for its result views: the database, the result, the query's token and the
        seconds a (re)load of the database took (0 when none)."""
        t_index = time.perf_counter()
        loads = self.index_loads
        loaded = self.index(target, m)
        index_seconds = time.perf_counter() - t_index if self.index_loads != loads else 0.0
        n = len(loaded.index)
        if max(m.qe, m.rerank) > n:
            what = f"+qe{m.qe}" if m.qe > n else f"+r{m.rerank}"
            raise WebError(
                400, f"method {m.name!r}: {what} is more than the {n} images of the database"
            )
        try:
            result = search_image(
                self.config(),
                loaded.index,
                extractor,
                image,
                name,
                box=box,
                top=top,
                method=m,
                protocol=protocol,
                full_ranking=full_ranking,
                map_cache=self._map_cache(main) if m.needs_maps else None,
            )
        except QueryError as exc:
            raise WebError(400, str(exc)) from exc
        token = secrets.token_urlsafe(12)
        assert result.record is not None
        with self._lock:
            self._queries[token] = KeptQuery(target, m, result.record, loaded.signature)
            while len(self._queries) > QUERY_CACHE:
                self._queries.popitem(last=False)
        return loaded, result, token, index_seconds

    def _query_image(
        self,
        target: Target,
        main: DatasetConfig,
        image_id: str | None,
        image_dataset: str | None,
        query_name: str | None,
        upload: bytes | None,
        upload_name: str,
        extractor: FeatureExtractor,
    ) -> tuple[Image.Image, Path, dict[str, Any], Query | None]:
        """The query image of a search, its name for messages, the answer's ``query`` entry so
        far, and its ground-truth query (None: not one of ``main``'s)."""
        gt_query = None
        if upload is not None:
            max_pixels = extractor.config.max_pixels
            image, name = self._decode_upload(upload, upload_name, max_pixels), Path(upload_name)
            query: dict[str, Any] = {"upload": upload_name}
        else:
            owner = image_dataset or main.name
            if owner not in [d.name for d in self._datasets_of(target)]:
                raise WebError(400, f"{owner!r} is not a dataset of {target.kind} {target.name!r}")
            path = self.image_path(owner, image_id)  # type: ignore[arg-type]
            try:
                image = load_query_image(path)
            except QueryError as exc:
                raise WebError(422, str(exc)) from exc
            name = path
            query = {"id": image_id, "dataset": owner}
            if owner == main.name:
                gt_query = self._gt_query(main, image_id, query_name)  # type: ignore[arg-type]
        return image, name, query, gt_query

    def _hits(
        self, target: Target, loaded: LoadedIndex, found: list[Hit], labels: dict[int, str] | None
    ) -> list[dict[str, Any]]:
        """The answer's results: each hit with its dataset, ground-truth label (``labels``
        None: no ground truth), image link and Dagster asset link."""
        index = loaded.index
        hits = []
        links: dict[str, str] = {}  # the Dagster asset of each dataset of the results
        for hit in found:
            row = loaded.rows[hit.image_id]
            owner = index.owner(row)
            if owner not in links:
                links[owner] = self.asset_url(target, owner)
            hits.append(
                {
                    "rank": hit.rank,
                    "id": hit.image_id,
                    "dataset": owner,
                    "score": round(hit.score, 6),
                    "label": None if labels is None else labels.get(row, "negative"),
                    "image": image_url(owner, hit.image_id),
                    "dagster": links[owner],
                }
            )
        return hits

    def _labels(
        self, loaded: LoadedIndex, q: Query, order: FullOrder
    ) -> tuple[dict[int, str], float, int]:
        """Ground-truth label of each database row, the query's AP over the whole ranking
        (Oxford AP, junk ignored; from where its positives and junk stand, without sorting
        the database) and its number of positives."""

        index, rows = loaded.index, loaded.rows
        owner = index.dataset.name

        def found(ids: frozenset[str]) -> list[int]:
            return [rows[i] for i in sorted(ids) if i in rows and index.owner(rows[i]) == owner]

        pos, junk = found(q.positives), found(q.junk)
        labels = {r: "positive" for r in pos}
        labels.update({r: "junk" for r in junk})
        ap = average_precision_at(order.positions(pos), order.positions(junk)) if pos else math.nan
        return labels, ap, len(pos)

    def check_upload(self, target: Target, data: bytes, name: str) -> dict[str, Any]:
        """Whether an upload can be searched in ``target``: read as a search reads it (no
        forward pass); its upright size, for the page to draw boxes on it."""
        main = self._main_dataset(target)
        image = self._decode_upload(data, name, main.extraction.max_pixels)
        return {"upload": name, "width": image.width, "height": image.height}

    def _decode_upload(self, data: bytes, name: str, max_pixels: int | None) -> Image.Image:
        """Decode an upload with indexing's limits (bomb limit, EXIF, odd modes)."""
        if len(data) > self.max_upload_bytes:
            raise WebError(413, upload_too_large(len(data), self.max_upload_bytes))
        if not data:
            raise WebError(400, f"the uploaded file {name!r} is empty")
        fd, tmp = tempfile.mkstemp(prefix="cw-upload-", suffix=Path(name).suffix[:10])
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return load_image(tmp, max_pixels=max_pixels)
        except ImageLoadError as exc:
            raise WebError(422, f"cannot read the uploaded file {name!r}: {exc.reason}") from exc
        finally:
            os.unlink(tmp)

    def asset_url(self, target: Target, dataset: str) -> str:
        """The Dagster UI page (lineage) of the asset whose descriptors hold ``dataset``'s
        images in ``target``."""
        config = self.config()
        ds = config.dataset(dataset)
        if ds.has_groundtruth:
            key = [dataset, "descriptors"]
        elif target.kind == "evaluation":
            key = [target.name, f"{dataset}_descriptors"]
        else:
            ev = next(
                (e for e in config.evaluations_for(dataset) if dataset in e.distractors), None
            )
            key = [ev.name, f"{dataset}_descriptors"] if ev else [dataset, "cam_features"]
        path = "/".join(urllib.parse.quote(k, safe="") for k in key)
        return f"{self.dagster_url}/assets/{path}?view=lineage"


def _query_classes(extractor: FeatureExtractor, rec: ImageFeatures | None) -> list[dict[str, Any]]:
    """The query's top 5 ImageNet classes (id, name, probability)."""
    assert rec is not None
    categories = imagenet_categories(int(extractor.backbone.classifier_weight.shape[0]))
    return [
        {
            "id": int(c),
            "name": categories[int(c)] if categories else str(int(c)),
            "prob": round(float(p), 4),
        }
        for c, p in zip(rec.class_ids[:5], rec.class_probs[:5], strict=True)
    ]
