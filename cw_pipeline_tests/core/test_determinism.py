"""The same inputs give bit-identical features and identical rankings on the CPU.

What holds (measured here, on the CPU, without any global torch flag): for a fixed torch thread
count, an image's features depend only on the image, the settings and the number of images in
its forward pass — not on the other images of the batch, its position in it, the order of the
files or the extractor instance; ``torch.use_deterministic_algorithms(True)`` runs and changes
nothing; the stored Parquet bytes are identical; rankings are identical, exact ties ordered by
database index. What does not: oneDNN picks its convolution kernels by batch size, so an image
in a batch of another size (a different ``batch_size``, or the last, partial batch of a run) can
differ in the last bits (about 1e-6 relative), as can a different intra-op thread count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from cw_pipeline.compute.features import records_to_table
from cw_pipeline.core.aggregation import aggregate, raw_descriptors
from cw_pipeline.core.backbones import load_backbone
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor, ImageFeatures
from cw_pipeline.core.feature_set import FeatureSet
from cw_pipeline.core.methods import Method, fit_pca
from cw_pipeline.core.ranking import rank
from cw_pipeline.core.search_settings import SearchParams
from cw_pipeline.store import FeatureStore

CONFIG = ExtractionConfig(stored_classes=8, resize="fixed:64x64")
N = 6
DUPLICATE = (1, 4)  #: image 4 is a byte-identical copy of image 1: an exact tie in every ranking


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("det")
    out = []
    for i in range(N):
        path = root / f"img{i}.jpg"
        if i == DUPLICATE[1]:
            path.write_bytes(out[DUPLICATE[0]][1].read_bytes())
        else:
            rng = np.random.default_rng(i)
            small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
            size = (96 + 8 * (i % 2), 72)  # two sizes, both resized to 64×64
            Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(path, quality=90)
        out.append((f"img{i}", path))
    return out


def extract(extractor: FeatureExtractor, files, order=None) -> list[ImageFeatures]:
    items = [files[i] for i in (order or range(len(files)))]
    got = dict(extractor.extract_files(items))
    return [got[key] for key, _ in files]


def table_bytes(records: list[ImageFeatures], tmp_path: Path, name: str) -> bytes:
    store = FeatureStore(tmp_path)
    table = records_to_table([f"img{i}" for i in range(N)], ["0" * 40] * N, records)
    store.write_table(f"t/{name}.parquet", table, metadata={"code_version": "v"})
    return store.read_bytes(f"t/{name}.parquet")


def assert_identical(a: list[ImageFeatures], b: list[ImageFeatures]) -> None:
    for ra, rb in zip(a, b, strict=True):
        for field in ("class_ids", "class_probs", "class_vectors", "sum_pooled", "boxes"):
            x, y = getattr(ra, field), getattr(rb, field)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), field


@pytest.fixture(scope="module")
def reference(lite0, files) -> list[ImageFeatures]:
    return extract(FeatureExtractor(CONFIG, backbone=lite0, batch_size=2), files)


def test_features_bit_identical_across_extractors_companions_and_order(
    lite0, files, reference, tmp_path
) -> None:
    runs = {
        "fresh network": extract(
            FeatureExtractor(CONFIG, backbone=load_backbone(), batch_size=2), files
        ),
        "other companions and order": extract(
            FeatureExtractor(CONFIG, backbone=lite0, batch_size=2), files, order=[0, 2, 4, 5, 3, 1]
        ),
    }
    ref_bytes = table_bytes(reference, tmp_path, "reference")
    for name, records in runs.items():
        assert_identical(reference, records)
        assert table_bytes(records, tmp_path, name.replace(" ", "_")) == ref_bytes, name
    assert_identical([reference[DUPLICATE[0]]], [reference[DUPLICATE[1]]])


def test_other_batch_sizes_agree_to_float_rounding(lite0, files, reference) -> None:
    """Not guaranteed bit-identical (kernels chosen by batch size): the same to float32
    rounding, relative to each vector's scale."""

    def close(a: np.ndarray, b: np.ndarray) -> bool:
        return float(np.abs(a - b).max()) <= 1e-4 * float(np.abs(a).max())

    for batch_size in (1, 3, 16):
        records = extract(FeatureExtractor(CONFIG, backbone=lite0, batch_size=batch_size), files)
        for ra, rb in zip(reference, records, strict=True):
            np.testing.assert_array_equal(ra.class_ids[:4], rb.class_ids[:4])
            np.testing.assert_allclose(rb.class_probs[:4], ra.class_probs[:4], atol=1e-5)
            assert close(ra.class_vectors[:4], rb.class_vectors[:4]), batch_size
            assert close(ra.sum_pooled, rb.sum_pooled), batch_size


def test_deterministic_algorithms_mode_runs_and_changes_nothing(lite0, files, reference) -> None:
    """No op of the extraction path is one torch flags as nondeterministic (it would raise)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        records = extract(FeatureExtractor(CONFIG, backbone=lite0, batch_size=2), files)
    finally:
        torch.use_deterministic_algorithms(before)
    assert_identical(reference, records)


def test_repeatable_with_several_threads(lite0, files) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = extract(FeatureExtractor(CONFIG, backbone=lite0, batch_size=2), files[:4])
        b = extract(
            FeatureExtractor(CONFIG, backbone=lite0, batch_size=2), files[:4], order=[2, 0, 3, 1]
        )
    finally:
        torch.set_num_threads(threads)
    assert_identical(a, b)


def featureset(records: list[ImageFeatures]) -> FeatureSet:
    return FeatureSet(
        ids=[f"img{i}" for i in range(N)],
        class_ids=np.stack([r.class_ids for r in records]),
        class_probs=np.stack([r.class_probs for r in records]),
        class_vectors=np.stack([r.class_vectors for r in records]),
        sum_pooled=np.stack([r.sum_pooled for r in records]),
        boxes=np.stack([r.boxes for r in records]),
    )


def rankings(records: list[ImageFeatures]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    feats = featureset(records)
    params = SearchParams(aggregated_classes=8, n_pca=2)
    pca_raw = fit_pca(Method.parse("raw+pca"), feats, params)
    pca_cls = fit_pca(Method.parse("ofa"), feats, params)
    out = {}
    for name, desc in {
        "raw": raw_descriptors(feats.sum_pooled),
        "raw+pca": raw_descriptors(feats.sum_pooled, pca_raw),
        "ofa": aggregate(feats.class_vectors, pca_cls, 8),
    }.items():
        r = rank(desc, desc)
        out[name] = (r.indices, r.scores)
    return out


def test_rankings_identical_and_ties_in_index_order(lite0, files, reference) -> None:
    again = extract(FeatureExtractor(CONFIG, backbone=load_backbone(), batch_size=2), files)
    first, second = rankings(reference), rankings(again)
    i, j = DUPLICATE
    for name, (idx, scores) in first.items():
        np.testing.assert_array_equal(idx, second[name][0], err_msg=name)
        assert scores.tobytes() == second[name][1].tobytes(), name
        for q in range(N):
            row = list(idx[q])
            assert row.index(j) == row.index(i) + 1, (name, q, row)  # the tie: lower index first
            assert scores[q, row.index(i)] == scores[q, row.index(j)]


def test_records_to_table_is_deterministic(reference) -> None:
    ids = [f"img{i}" for i in range(N)]
    a = records_to_table(ids, ["0" * 40] * N, reference)
    b = records_to_table(ids, ["0" * 40] * N, list(reference))
    assert a.equals(b) and isinstance(a, pa.Table)
