"""Tests for cw_pipeline.store: the fsspec feature store (local folders and memory://)."""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cw_pipeline import store as store_mod
from cw_pipeline.compute import report_figures
from cw_pipeline.store import (
    CorruptFileError,
    CorruptShardError,
    FeatureStore,
    bounded_component,
    decode_component,
    encode_component,
    feature_store,
    parse_shard_path,
    shard_name_from_path,
)


@pytest.fixture(params=["local", "file-url", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FeatureStore]:
    """A fresh store on the local disk (path or file:// URL) or in fsspec's memory fs."""
    if request.param == "local":
        yield FeatureStore(tmp_path / "wh")
    elif request.param == "file-url":
        yield FeatureStore(f"file://{tmp_path}/wh")
    else:
        root = f"memory://cw-test-{uuid.uuid4().hex}"
        st = FeatureStore(root)
        yield st
        if st.fs.exists(st.path()):
            st.fs.rm(st.path(), recursive=True)


def table(n: int = 3, tag: str = "x") -> pa.Table:
    return pa.table(
        {
            "image_id": [f"{tag}{i}" for i in range(n)],
            "value": pa.array([float(i) for i in range(n)], pa.float32()),
            "vec": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int16())),
        }
    )


def raw_names(st: FeatureStore, prefix: str = "") -> list[str]:
    """Every file name under ``prefix`` as the filesystem shows it (temporaries included)."""
    top = st.path(prefix) if prefix else st.path()
    return sorted(p.rsplit("/", 1)[-1] for p in st.fs.find(top)) if st.fs.exists(top) else []


# --------------------------------------------------------------------------------------------
# names and paths
# --------------------------------------------------------------------------------------------


def test_shard_path_layout() -> None:
    assert (
        FeatureStore.shard_path("cam_features", "oxford5k", "shard-00012")
        == "cam_features/dataset=oxford5k/shard=shard-00012.parquet"
    )
    assert (
        FeatureStore.shard_path("cam_features", "demo-a", "_root")
        == "cam_features/dataset=demo-a/shard=_root.parquet"
    )
    assert (
        FeatureStore.shard_path("k", "d", "paris/eiffel 2=x%")
        == "k/dataset=d/shard=paris%2Feiffel%202%3Dx%25.parquet"
    )


@pytest.mark.parametrize(
    "name",
    ["a", "shard_001", "A.b-c_d", "sub/dir", "x y", "100%", "k=v", "é", "日本", "..", ".",
     ".hidden", "a.", "tab\tnew\nline", "%41", "emoji😀"],
)  # fmt: skip
def test_component_encoding_round_trips(name: str) -> None:
    encoded = encode_component(name)
    assert all(c.isascii() and (c.isalnum() or c in "._-%") for c in encoded)
    assert not encoded.startswith(".")
    assert decode_component(encoded) == name
    rel = FeatureStore.shard_path("kind", name, name)
    assert shard_name_from_path(rel) == name
    assert parse_shard_path(rel) == ("kind", name, name)
    assert parse_shard_path("s3://bucket/prefix/" + rel) == ("kind", name, name)


def test_bounded_components_fit_a_file_name_and_stay_distinct(tmp_path: Path) -> None:
    short = ["a", "x" * 200, "é" * 33, "a~0123456789abcdef"]
    long = ["x" * 201, "x" * 202, "é" * 34, "東" * 80, "é" * 40 + "a", "é" * 40 + "b"]
    names = {n: bounded_component(n) for n in short + long}
    assert all(names[n] == encode_component(n) for n in short)  # unchanged when they fit
    for n in long:
        assert len(names[n]) <= 200 and re.fullmatch(
            r"([A-Za-z0-9._-]|%[0-9A-F]{2})+~[0-9a-f]{16}", names[n]
        )
        (tmp_path / f"{names[n]}.png").write_bytes(b"")  # a file system takes it
    assert len(set(names.values())) == len(names)
    # Sheets and CAM figures of the reports are named this way.
    figure_names = {report_figures._safe_name(f"q/{'x' * 300}{i}") for i in range(3)}
    assert len(figure_names) == 3 and all(len(n) <= 200 for n in figure_names)


def test_encoding_errors() -> None:
    for bad in ("", None):
        with pytest.raises(ValueError, match="non-empty string"):
            encode_component(bad)  # type: ignore[arg-type]
    for bad in ("a b", "%4", "%zz", "", "%FF"):
        with pytest.raises(ValueError, match="not an encoded name"):
            decode_component(bad)
    with pytest.raises(ValueError, match="not a shard path"):
        shard_name_from_path("k/dataset=d/other.parquet")
    with pytest.raises(ValueError, match="not a shard path"):
        parse_shard_path("dataset=d/shard=x.parquet")
    with pytest.raises(ValueError, match="invalid kind"):
        FeatureStore.shard_path(".tmp", "d", "s")
    with pytest.raises(ValueError, match="invalid kind"):
        FeatureStore.shard_path("a/b", "d", "s")


def test_paths_and_urls(tmp_path: Path) -> None:
    local = FeatureStore(tmp_path)
    assert local.path() == str(tmp_path)
    assert local.path("a", "b/c.parquet") == f"{tmp_path}/a/b/c.parquet"
    assert local.url("a") == f"{tmp_path}/a"
    assert FeatureStore(f"file://{tmp_path}") == local
    assert FeatureStore(str(tmp_path) + "/") == local
    memory = FeatureStore("memory://bucket/prefix")
    assert memory.path("x.parquet") == "/bucket/prefix/x.parquet"
    assert memory.url("x.parquet") == "memory:///bucket/prefix/x.parquet"
    assert memory != local and repr(memory) == "FeatureStore('memory://bucket/prefix')"
    for bad in ("../x", "a/../b", "/abs", "a//b", "a/./b", "a\\b", ""):
        with pytest.raises(ValueError, match="invalid store path"):
            local.write_bytes(bad, b"x")


def test_store_pickles(tmp_path: Path) -> None:
    st = FeatureStore(tmp_path)
    st.write_bytes("a.bin", b"1")
    clone = pickle.loads(pickle.dumps(st))
    assert clone == st and clone.read_bytes("a.bin") == b"1"


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def test_table_round_trip_with_metadata(store: FeatureStore) -> None:
    rel = FeatureStore.shard_path("cam_features", "demo-a", "s0")
    t = table()
    assert store.write_table(rel, t, metadata={"code_version": "v1", "n": "3"}) == rel
    back = store.read_table(rel)
    assert back.drop_columns([]).equals(t.replace_schema_metadata(back.schema.metadata))
    assert back.schema.metadata[b"code_version"] == b"v1"
    assert store.read_metadata(rel) == {"code_version": "v1", "n": "3"}
    assert store.read_table(rel, columns=["value"]).column_names == ["value"]
    with pytest.raises(KeyError, match=r"no column\(s\) \['nope'\]"):
        store.read_table(rel, columns=["value", "nope"])
    # overwrite replaces the file and its metadata
    store.write_table(rel, table(5, "y"))
    assert store.read_table(rel).num_rows == 5 and store.read_metadata(rel) == {}
    # the files are zstd-compressed Parquet
    meta = pq.ParquetFile(io.BytesIO(store.read_bytes(rel))).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_table_argument_errors(store: FeatureStore) -> None:
    with pytest.raises(ValueError, match=r"must end with '\.parquet'"):
        store.write_table("x.arrow", table())
    with pytest.raises(TypeError, match="metadata keys and values must be strings"):
        store.write_table("x.parquet", table(), metadata={"n": 3})  # type: ignore[dict-item]
    with pytest.raises(FileNotFoundError, match=r"not in the feature store: .*missing\.parquet"):
        store.read_table("missing.parquet")
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        store.read_bytes("missing.bin")
    assert store.list() == []


def test_truncated_parquet_raises_corrupt_shard_error(store: FeatureStore) -> None:
    rel = FeatureStore.shard_path("cam_features", "d", "s")
    store.write_table(rel, table(200))
    data = store.read_bytes(rel)
    for broken in (data[: len(data) // 2], data[:-1], b"", b"PAR1 not really parquet"):
        store.fs.pipe_file(store.path(rel), broken)
        with pytest.raises(CorruptShardError) as info:
            store.read_table(rel)
        assert isinstance(info.value, ValueError)
        assert info.value.relpath == rel
        assert str(info.value).startswith(f"corrupt or truncated Parquet file '{store.url(rel)}'")
        with pytest.raises(CorruptShardError):
            store.read_metadata(rel)


def test_damaged_page_is_caught_by_checksums(store: FeatureStore) -> None:
    rel = "t/x.parquet"
    big = pa.table({"v": pa.array(range(5000), pa.int64())})
    store.write_table(rel, big)
    data = bytearray(store.read_bytes(rel))
    data[200] ^= 0xFF  # inside the first data page, after the 4-byte magic and page header
    store.fs.pipe_file(store.path(rel), bytes(data))
    with pytest.raises(CorruptShardError, match=r"t/x\.parquet"):
        store.read_table(rel)


def test_killed_write_leaves_no_partial_file(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    rel = "cam_features/dataset=d/shard=s.parquet"
    store.write_table(rel, table(2, "old"))

    def dying_write(tbl: pa.Table, where: object, **kwargs: object) -> None:
        where.write(b"PAR1 half a file")  # type: ignore[attr-defined]
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(feature_store.pq, "write_table", dying_write)
    with pytest.raises(KeyboardInterrupt):
        store.write_table(rel, table(9, "new"))
    with pytest.raises(KeyboardInterrupt):
        store.write_table("cam_features/dataset=d/shard=fresh.parquet", table())
    monkeypatch.undo()
    assert store.read_table(rel).column("image_id").to_pylist() == ["old0", "old1"]
    assert store.list() == [rel]
    assert raw_names(store) == ["shard=s.parquet"]  # the temporary file was removed too


def test_temp_files_left_by_a_dead_process_are_invisible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = FeatureStore(tmp_path)
    monkeypatch.setattr(feature_store.os, "replace", _raise_oserror)
    monkeypatch.setattr(feature_store.os, "unlink", lambda path: None)  # the process "dies"
    with pytest.raises(OSError, match="power cut"):
        st.write_table("k/dataset=d/shard=s.parquet", table())
    monkeypatch.undo()
    left = raw_names(st)
    assert len(left) == 1 and left[0].startswith(".shard=s.parquet.") and left[0].endswith(".tmp")
    assert not left[0].endswith(".parquet")
    assert st.list() == [] and st.list(suffix=None) == []
    assert not st.exists("k/dataset=d/shard=s.parquet")
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        st.dataset("k")
    st.write_table("k/dataset=d/shard=t.parquet", table(4))
    assert st.dataset("k").count_rows() == 4


def _raise_oserror(*args: object) -> None:
    raise OSError("power cut")


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_concurrent_writers_leave_one_complete_file(kind: str, tmp_path: Path) -> None:
    root = str(tmp_path) if kind == "local" else f"memory://cw-conc-{uuid.uuid4().hex}"
    st = FeatureStore(root)
    rel = "cam_features/dataset=d/shard=s.parquet"
    tables = {f"w{i}": table(50 + i, f"w{i}-") for i in range(8)}
    st.write_table(rel, tables["w0"])
    errors: list[BaseException] = []
    stop = threading.Event()
    seen: set[int] = set()

    def writer(name: str) -> None:
        try:
            for _ in range(10):
                st.write_table(rel, tables[name], metadata={"writer": name})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.add(st.read_table(rel).num_rows)  # never partial, never corrupt
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in tables]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers + threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    final = st.read_table(rel)
    writer_name = st.read_metadata(rel)["writer"]
    assert final.equals(tables[writer_name].replace_schema_metadata(final.schema.metadata))
    assert seen <= {t.num_rows for t in tables.values()}
    assert st.list() == [rel] and raw_names(st) == ["shard=s.parquet"]
    if kind == "memory":
        st.fs.rm(st.path(), recursive=True)


# --------------------------------------------------------------------------------------------
# bytes, JSON, listing, deleting, datasets
# --------------------------------------------------------------------------------------------


def test_bytes_and_json(store: FeatureStore) -> None:
    store.write_bytes("blobs/a.bin", b"\x00\x01")
    assert store.read_bytes("blobs/a.bin") == b"\x00\x01"
    obj = {"b": [1, 2.5, None], "a": "é", "nested": {"z": True}}
    store.write_json("meta/m.json", obj)
    assert store.read_json("meta/m.json") == obj
    text = store.read_bytes("meta/m.json").decode()
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n") and "é" in text
    store.write_bytes("meta/bad.json", b"{not json")
    with pytest.raises(CorruptFileError, match=r"meta/bad\.json': invalid JSON"):
        store.read_json("meta/bad.json")
    assert store.list(suffix=".json") == ["meta/bad.json", "meta/m.json"]


def test_list_exists_delete(store: FeatureStore) -> None:
    names = [
        FeatureStore.shard_path("cam_features", ds, sh)
        for ds in ("b", "a")
        for sh in ("2", "10", "1")
    ]
    for rel in names:
        store.write_table(rel, table(1))
    store.write_json("cam_features/dataset=a/_index.json", {})
    store.write_bytes("cam_features/dataset=a/.hidden.parquet", b"x")
    store.write_bytes("cam_features/dataset=a/.shard=9.parquet.abc.tmp", b"x")
    store.write_bytes("other/x.parquet", b"x")
    assert store.list("cam_features") == sorted(names)
    assert store.list("cam_features/dataset=a") == [
        "cam_features/dataset=a/shard=1.parquet",
        "cam_features/dataset=a/shard=10.parquet",
        "cam_features/dataset=a/shard=2.parquet",
    ]
    assert store.list("cam_features/dataset=a", suffix=None) == [
        "cam_features/dataset=a/_index.json",
        *store.list("cam_features/dataset=a"),
    ]
    assert store.list() == sorted([*names, "other/x.parquet"])
    assert store.list("nothing/here") == []
    assert store.exists(names[0]) and store.exists("cam_features") and not store.exists("zz")
    assert store.delete(names[0]) is True
    assert store.delete(names[0]) is False
    assert not store.exists(names[0])
    with pytest.raises(IsADirectoryError, match="recursive=True"):
        store.delete("cam_features/dataset=a")
    assert store.delete("cam_features/dataset=a", recursive=True) is True
    assert store.list("cam_features") == sorted(names[1:3])


def test_dataset_over_shards(store: FeatureStore) -> None:
    for ds in ("demo-a", "x y"):
        for i in range(3):
            store.write_table(
                FeatureStore.shard_path("cam_features", ds, f"s{i}"), table(2, f"{ds}/{i}/")
            )
    store.write_bytes("cam_features/dataset=demo-a/.shard=s9.parquet.1.tmp", b"partial")
    whole = store.dataset("cam_features")
    assert whole.count_rows() == 12
    assert whole.schema.names == ["image_id", "value", "vec"]
    got = whole.to_table(columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(got) == sorted(
        f"{ds}/{i}/{j}" for ds in ("demo-a", "x y") for i in range(3) for j in range(2)
    )
    one = store.dataset("cam_features/dataset=x%20y")
    assert one.count_rows() == 6
    hive = store.dataset("cam_features", partitioning="hive")
    assert "dataset" in hive.schema.names
    rows = hive.to_table(columns=["image_id", "dataset"]).to_pylist()
    assert all(r["image_id"].startswith(r["dataset"] + "/") for r in rows)
    assert {r["dataset"] for r in rows} == {"demo-a", "x y"}
    import pyarrow.dataset as pads

    filtered = hive.to_table(filter=pads.field("dataset") == "demo-a")
    assert filtered.num_rows == 6
    schema = pa.schema([("image_id", pa.string())])
    assert store.dataset("nothing", schema=schema).to_table().num_rows == 0
    with pytest.raises(FileNotFoundError, match="no Parquet files under"):
        store.dataset("nothing")
    with pytest.raises(ValueError, match="partitioning"):
        store.dataset("cam_features", partitioning="directory")


def test_local_writes_use_os_replace_of_a_hidden_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = FeatureStore(tmp_path)
    calls: list[tuple[str, str]] = []
    real = os.replace

    def spy(src: str, dst: str) -> None:
        calls.append((src, dst))
        real(src, dst)

    monkeypatch.setattr(feature_store.os, "replace", spy)
    st.write_bytes("a/b.bin", b"1")
    st.write_table("a/t.parquet", table())
    assert [Path(d).name for _, d in calls] == ["b.bin", "t.parquet"]
    for src, dst in calls:
        name = Path(src).name
        assert Path(src).parent == Path(dst).parent
        assert name.startswith(f".{Path(dst).name}.") and name.endswith(".tmp")


def test_tables_dictionary_encode_text_columns_only(tmp_path: Path) -> None:
    """Ids are dictionary-encoded; int8 class-vector lists are not (slower both ways)."""
    st = FeatureStore(tmp_path)
    table = pa.table(
        {
            "image_id": [f"img_{i % 3}" for i in range(50)],
            "class_vectors": pa.array([[i % 7] * 8 for i in range(50)], pa.list_(pa.int8(), 8)),
        }
    )
    st.write_table("t/x.parquet", table)
    meta = pq.ParquetFile(tmp_path / "t" / "x.parquet").metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(2)}
    assert any("DICTIONARY" in e for e in encodings["image_id"])
    vectors = next(v for k, v in encodings.items() if k.startswith("class_vectors"))
    assert not any("DICTIONARY" in e for e in vectors)
    assert st.read_table("t/x.parquet").equals(table)


# --------------------------------------------------------------------------------------------
# the warehouse layout
# --------------------------------------------------------------------------------------------


def test_every_artefact_has_its_named_path() -> None:
    """The layout the assets have always written (existing warehouses stay readable)."""
    assert (
        store_mod.manifest_path("oxford5k", "b000")
        == "manifest/dataset=oxford5k/shard=b000.parquet"
    )
    assert store_mod.features_path("demo-a", "été 1") == (
        "cam_features/dataset=demo-a/shard=%C3%A9t%C3%A9%201.parquet"
    )
    assert store_mod.rejected_path("d", "s") == "rejected/dataset=d/shard=s.parquet"
    assert store_mod.shard_folder("cam_features", "d") == "cam_features/dataset=d"
    assert store_mod.plan_path("oxford5k") == "plans/oxford5k.json"
    assert store_mod.checkpoint_folder("cam_features", "d", "s") == (
        "_checkpoints/cam_features/dataset=d/shard=s"
    )
    assert (
        store_mod.query_features_path("demo-a") == "query_features/dataset=demo-a/queries.parquet"
    )
    assert store_mod.pca_path("ukb", "class") == "pca/dataset=ukb/class"
    assert store_mod.pca_path("ukb", "raw", 2) == "pca/dataset=ukb/raw-half2"
    assert store_mod.pca_folder("ukb") == "pca/dataset=ukb"
    assert store_mod.descriptors_folder("demo-a") == "descriptors/dataset=demo-a"
    assert store_mod.descriptors_path("demo-a", "raw+pca") == (
        "descriptors/dataset=demo-a/raw%2Bpca.parquet"
    )
    assert store_mod.distractor_descriptors_folder("ev") == "distractor_descriptors/evaluation=ev"
    assert store_mod.distractor_descriptors_folder("ev", "flickr") == (
        "distractor_descriptors/evaluation=ev/set=flickr"
    )
    assert store_mod.distractor_descriptors_path("ev", "flickr", "ofa", "b001") == (
        "distractor_descriptors/evaluation=ev/set=flickr/agg=ofa/shard=b001.parquet"
    )
    assert store_mod.rankings_path("oxford105k", "ofa+r100+qe10") == (
        "rankings/evaluation=oxford105k/method=ofa%2Br100%2Bqe10.parquet"
    )
    assert store_mod.report_path("demo-a", "report.md") == "demo-a/report.md"
    assert store_mod.report_path("demo-a", "queries/q.png") == "demo-a/queries/q.png"
    assert store_mod.report_folder("demo-a") == "demo-a"


def test_layout_refuses_bad_names() -> None:
    with pytest.raises(ValueError, match="unknown shard kind 'pca'"):
        store_mod.shard_folder("pca", "d")
    with pytest.raises(ValueError, match="a PCA half is 1 or 2, got 3"):
        store_mod.pca_path("d", "class", 3)
    with pytest.raises(ValueError, match="non-empty string"):
        store_mod.descriptors_path("", "ofa")
    with pytest.raises(ValueError, match="invalid store path"):
        store_mod.report_path("ev", "../elsewhere.md")
    with pytest.raises(ValueError, match="invalid kind"):
        store_mod.checkpoint_folder("a/b", "d", "s")
    with pytest.raises(ValueError, match="aggregation 'ofa' given without a distractor set"):
        store_mod.distractor_descriptors_folder("ev", None, "ofa")


def _pca_model():
    import numpy as np

    from cw_pipeline.core.aggregation import PCAWhitening

    rng = np.random.default_rng(3)
    return PCAWhitening.fit(rng.normal(size=(40, 6)), dims=4, metadata={"training_set": "paris"})


def test_pca_round_trip(store: FeatureStore) -> None:
    import numpy as np

    model = _pca_model()
    rel = store_mod.pca_path("oxford5k", "class")
    assert not store.pca_exists(rel)
    assert store.write_pca(rel, model) == rel
    assert store.pca_exists(rel)
    assert store.list("pca", suffix=None) == [f"{rel}.json", f"{rel}.npz"]
    loaded = store.read_pca(rel)
    for name in ("mean", "components", "eigenvalues"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    assert loaded.metadata == model.metadata and loaded.metadata["output_dim"] == 4
    assert store.read_pca_metadata(rel) == model.metadata


def test_pca_files_of_earlier_versions_stay_readable(tmp_path: Path) -> None:
    """The format the pca_model asset wrote before the one serialisation: ``np.savez`` of the
    three arrays beside the JSON metadata."""
    import json

    import numpy as np

    model = _pca_model()
    folder = tmp_path / "wh" / "pca" / "dataset=oxford5k"
    folder.mkdir(parents=True)
    np.savez(
        folder / "class.npz",
        mean=model.mean,
        components=model.components,
        eigenvalues=model.eigenvalues,
    )
    (folder / "class.json").write_text(json.dumps(model.metadata))
    loaded = FeatureStore(tmp_path / "wh").read_pca("pca/dataset=oxford5k/class")
    np.testing.assert_array_equal(loaded.components, model.components)
    assert loaded.metadata == model.metadata
    # ... and what write_pca writes decodes the same way as those files.
    again = FeatureStore(tmp_path / "again")
    again.write_pca("m", model)
    with np.load(tmp_path / "again" / "m.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["components", "eigenvalues", "mean"]


def test_pca_read_errors_name_the_file(store: FeatureStore) -> None:
    model = _pca_model()
    with pytest.raises(FileNotFoundError, match=r"not in the feature store: .*m\.npz"):
        store.read_pca("m")
    store.write_pca("m", model)
    store.write_bytes("m.npz", b"truncated")
    with pytest.raises(CorruptFileError, match=r"m\.npz': not a PCA model"):
        store.read_pca("m")
    store.write_pca("m", model)
    store.write_json("m.json", [1, 2])
    with pytest.raises(CorruptFileError, match=r"m\.json': PCA metadata must be a JSON object"):
        store.read_pca("m")
    with pytest.raises(CorruptFileError, match=r"m\.json': PCA metadata must be a JSON object"):
        store.read_pca_metadata("m")
    store.delete("m.json")
    assert not store.pca_exists("m")
    with pytest.raises(FileNotFoundError, match=r"m\.json"):
        store.read_pca("m")


#: Text that only a warehouse path holds: a hive-style ``key=`` folder, a top-level artefact
#: folder, or a report file name.
_WAREHOUSE_TEXT = re.compile(
    r"(^|/)(dataset|evaluation|set|agg|shard|method|extraction)=|"
    r"^/?(manifest|cam_features|rejected|query_features|pca|descriptors|"
    r"distractor_descriptors|rankings|plans|_checkpoints|feature_maps|pair_cache)/|"
    r"^/?(report\.md|report\.json|per_query_ap\.csv)$"
)


def _string_parts(tree) -> Iterator[tuple[int, str]]:
    """Every string constant of a module, f-strings' literal parts included."""
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_no_module_but_store_builds_warehouse_paths() -> None:
    """Grep-style, on the syntax tree: outside the store package no string literal of the package
    (docstrings and comments aside) holds a piece of a warehouse path, and nothing calls
    ``shard_path`` with a literal kind: every path comes from store's named functions."""
    import ast

    store_package = Path(store_mod.__file__).parent
    package = store_package.parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if store_package in path.parents:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if id(node) in docstrings:
                continue
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if _WAREHOUSE_TEXT.search(node.value):
                    found.append(f"{path.relative_to(package)}:{node.lineno}: {node.value!r}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "shard_path"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.append(f"{path.relative_to(package)}:{node.lineno}: shard_path(literal)")
    assert found == []


def test_the_path_check_catches_a_path_built_elsewhere() -> None:
    """The pattern of the test above matches each way the modules used to build paths."""
    import ast

    built = [
        'f"query_features/dataset={encode_component(ds.name)}/queries.parquet"',
        'f"pca/dataset={encode_component(dataset)}/{space}{suffix}"',
        'f"rankings/evaluation={e}/method={m}.parquet"',
        'f"{ev}/report.md"',
        'f"plans/{ds.name}.json"',
        'f"{CHECKPOINT_ROOT}/{kind}/dataset={d}/shard={s}"',
        '"distractor_descriptors/evaluation=" + ev',
    ]
    for source in built:
        parts = [v for _, v in _string_parts(ast.parse(source))]
        assert any(_WAREHOUSE_TEXT.search(p) for p in parts), source
    for harmless in ['"dataset"', '"image_id"', 'f"{ev.name}: rankings"', '"report"']:
        parts = [v for _, v in _string_parts(ast.parse(harmless))]
        assert not any(_WAREHOUSE_TEXT.search(p) for p in parts), harmless


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), OSError),
        (OSError(errno.EROFS, "Read-only file system"), OSError),
        (PermissionError(errno.EACCES, "Permission denied", "/somewhere/.x.tmp"), PermissionError),
        (OSError(errno.EIO, "Input/output error"), OSError),
    ],
)
def test_an_io_error_names_the_file_being_written(tmp_path, monkeypatch, error, kind) -> None:
    """Disk full, read-only, permission denied, EIO: one line naming the file (not the
    hidden temporary), the errno kept, nothing left behind."""
    store = FeatureStore(tmp_path / "wh")

    def fail(fd):
        raise error

    monkeypatch.setattr(os, "fsync", fail)
    table = pa.table({"image_id": ["a"]})
    for write, rel in (
        (lambda: store.write_bytes("reports/x/report.md", b"text"), "reports/x/report.md"),
        (lambda: store.write_table("features/t.parquet", table), "features/t.parquet"),
    ):
        with pytest.raises(kind) as info:
            write()
        assert info.value.errno == error.errno
        assert str(info.value) == f"[Errno {error.errno}] {error.strerror}: '{store.url(rel)}'"
        assert not any(p.is_file() for p in (tmp_path / "wh").rglob("*")), "left behind"


def test_a_folder_removed_during_a_write_is_made_again(tmp_path, monkeypatch) -> None:
    """Another run removes the folder (its checkpoints) while this one writes a file there:
    the folder is made again and the file written whole (not FileNotFoundError)."""
    import shutil

    store = FeatureStore(tmp_path / "wh")
    real_fsync, removed = os.fsync, []

    def racing_cleanup(fd):
        if not removed:
            removed.append(True)
            shutil.rmtree(tmp_path / "wh" / "_checkpoints")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", racing_cleanup)
    rel = "_checkpoints/cam_features/dataset=d/shard=s/part-1.parquet"
    table = pa.table({"image_id": ["a", "b"]})
    store.write_table(rel, table)
    assert removed and store.read_table(rel).equals(table)
    assert [p.name for p in (tmp_path / "wh").rglob("*") if p.is_file()] == ["part-1.parquet"]
