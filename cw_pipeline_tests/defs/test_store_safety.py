"""What the pipeline writes is data, never code: no pickles in a fully materialized warehouse
(issue 6, Safety). PCA models are ``.npz`` (plain numeric arrays) + JSON metadata; features,
manifests, descriptors and rankings are Parquet."""

from __future__ import annotations

import errno
import json
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest

#: First bytes of a pickle (the PROTO opcode, protocols 2-5).
PICKLE_MAGIC = tuple(bytes([0x80, p]) for p in range(2, 6))


def test_materialized_store_holds_no_pickles(indexed_project):
    root = indexed_project.root / "warehouse"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    by_suffix: dict[str, int] = {}
    for path in files:
        by_suffix[path.suffix] = by_suffix.get(path.suffix, 0) + 1
        assert path.suffix in {".parquet", ".json", ".npz"}, path
        assert not path.read_bytes()[:2].startswith(PICKLE_MAGIC), path
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    assert not zf.read(name).startswith(PICKLE_MAGIC), f"{path}:{name}"
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            assert set(arrays) == {"mean", "components", "eigenvalues"}
            assert all(a.dtype.kind == "f" for a in arrays.values()), path
            json.loads(path.with_suffix(".json").read_text())  # its metadata beside it
        elif path.suffix == ".parquet":
            pq.read_metadata(path)
        else:
            json.loads(path.read_text())
    # Every kind of output is there: the check above covered real files.
    assert by_suffix[".npz"] >= 4 and by_suffix[".parquet"] >= 20 and by_suffix[".json"] >= 4
    kinds = {p.relative_to(root).parts[0] for p in files}
    assert {"manifest", "cam_features", "rejected", "pca", "descriptors", "rankings"} <= kinds


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")],
)
def test_a_write_error_in_a_run_names_the_file_and_the_asset(
    fresh_project, monkeypatch, capsys, code, words
) -> None:
    """Disk full or a read-only store while a run writes: the command's one error line names
    the asset and partition being materialized and the file, errno kept; no traceback."""
    import os

    from cw_pipeline.cli import main

    def full(fd):
        raise OSError(code, words)

    monkeypatch.setattr(os, "fsync", full)
    config = str(fresh_project.root / "datasets.yaml")
    assert main(["index", "--dataset", "delta", "--config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = next(x for x in err if x.startswith("cw-pipeline: error:"))
    assert f"[Errno {code}] {words} (writing for asset delta/manifest [misc1]): '" in line, err
    assert "manifest/dataset=delta/shard=misc1.parquet'" in line
    assert not [x for x in err if x.startswith("Traceback")]
