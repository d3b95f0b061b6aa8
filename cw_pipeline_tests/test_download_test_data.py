"""``make test-data`` (``cw-pipeline download test-data``) against a local server: the UKBench
members read with Range requests only, checksums, resume, a server without Range, offline."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cw_pipeline.cli import main
from cw_pipeline.download import test_data as td
from cw_pipeline.download.errors import HostUnreachableError, IntegrityError
from cw_pipeline.download.sources import TEST_DATA_GROUNDTRUTH, UKBENCH_URLS
from cw_pipeline_tests.file_server import FileServer
from cw_pipeline_tests.real_data import missing_parts


def _jpeg(n: int, size: tuple[int, int] = (640, 480)) -> bytes:
    rng = np.random.default_rng(n)
    pixels = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).resize(size).save(out, "JPEG", quality=70)
    return out.getvalue()


def _zip(count: int = 604, padding: int = 8_000_000) -> bytes:
    """A UKBench-like archive: ``full/ukbenchNNNNN.jpg``, a README, and a large member after
    the first 600 images that a Range reader never needs."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("README.txt", "UKBench")
        small = _jpeg(0, (64, 48))  # resized to 320x240; the first is UKBench's 640x480
        for n in range(count):
            archive.writestr(f"full/ukbench{n:05d}.jpg", small if n else _jpeg(1))
        archive.writestr("full/ukbench09999.jpg", np.random.default_rng(0).bytes(padding))
    return out.getvalue()


def _tgz(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _gnd_pickle(n: int) -> bytes:
    import pickle

    query = {"bbx": [0, 0, 1, 1], "ok": [0], "junk": []}
    gnd = {"imlist": [f"img_{n}"], "qimlist": [f"img_{n}"], "gnd": [query]}
    return pickle.dumps(gnd, protocol=2)


def _serve_all(server: FileServer) -> dict[str, str]:
    """Every source served through the mirror; returns the expected checksums."""
    sums: dict[str, str] = {}
    for k, (folder, urls) in enumerate(TEST_DATA_GROUNDTRUTH.items()):
        for m, url in enumerate(urls):
            name = url.rsplit("/", 1)[1]
            if name.endswith(".pkl"):
                data = _gnd_pickle(10 * k + m)
                sums[f"{folder}/{name}"] = hashlib.sha256(data).hexdigest()
                server.serve(url, data)
            else:
                files = {f"q{k}_{i}_good.txt": f"img_{i}\n".encode() for i in range(3)}
                sums.update(
                    {f"{folder}/{n}": hashlib.sha256(d).hexdigest() for n, d in files.items()}
                )
                server.serve(url, _tgz(files))
    server.serve(UKBENCH_URLS[0], _zip())
    return sums


def _requested_bytes(server: FileServer, path: str) -> int:
    total = 0
    for rng in server.requested(path):
        assert rng is not None, "a whole-file request"
        start, end = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        total += end - start + 1
    return total


def test_builds_the_tree_the_tests_look_for(tmp_path: Path, server: FileServer) -> None:
    sums = _serve_all(server)
    dest = tmp_path / "data" / "test-data"
    lines: list[str] = []
    td.fetch_test_data(dest, mirror=server.url, sums=sums, log=lines.append)
    assert missing_parts(dest) == []  # what cw_pipeline_tests.real_data requires
    assert not (tmp_path / "data" / ".test-data.partial").exists()
    images = sorted((dest / "ukbench" / "jpg").iterdir())
    assert [p.name for p in images] == [f"ukbench{n:05d}.jpg" for n in range(600)]
    with Image.open(images[0]) as first:
        assert first.size == (320, 240) and first.mode == "RGB"
    for name, digest in sums.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
    # Only what the 600 images need was read of the zip, in Range requests
    zip_path = server.serve(UKBENCH_URLS[0], _zip())
    zip_size = len(server.files[zip_path])
    assert _requested_bytes(server, zip_path) < zip_size * 2 / 3
    # A complete folder: nothing fetched again
    before = len(server.requests)
    td.fetch_test_data(dest, mirror=server.url, sums=sums, log=lines.append)
    assert len(server.requests) == before and lines[-1] == f"test-data: {dest} is complete"


def test_a_server_without_range_gets_the_whole_archive(tmp_path: Path, server: FileServer) -> None:
    sums = _serve_all(server)
    server.ignore_range = True
    dest = tmp_path / "test-data"
    td.fetch_test_data(dest, mirror=server.url, sums=sums, log=None)
    assert missing_parts(dest) == []
    assert not (tmp_path / ".test-data.downloads").exists()  # the archive cache is removed


def test_a_cut_connection_is_retried(tmp_path: Path, server: FileServer, monkeypatch) -> None:
    sums = _serve_all(server)
    monkeypatch.setattr(td.time, "sleep", lambda _s: None)
    zip_path = server.serve(UKBENCH_URLS[0], _zip())
    server.cut[zip_path] = 100  # the first answer for the zip stops after 100 bytes
    td.fetch_test_data(tmp_path / "td", mirror=server.url, sums=sums, log=None)
    assert missing_parts(tmp_path / "td") == []


def test_a_run_cut_short_resumes_where_it_stopped(tmp_path: Path, server: FileServer) -> None:
    sums = _serve_all(server)
    zip_path = server.serve(UKBENCH_URLS[0], _zip())
    data = server.files.pop(zip_path)  # the archive's hosts fail: ground truth only
    dest = tmp_path / "test-data"
    with pytest.raises(HostUnreachableError, match=r"ukbench\.zip could not be fetched"):
        td.fetch_test_data(dest, mirror=server.url, sums=sums, log=None, timeout=5)
    partial = tmp_path / ".test-data.partial"
    assert not dest.exists() and (partial / "groundtruth" / "revisited").is_dir()
    gt_requests = len([p for p, _ in server.requests if not p.endswith(".zip")])
    server.files[zip_path] = data
    # Half the images written before the process was killed, one of them torn.
    folder = partial / "ukbench" / "jpg"
    td.extract_ukbench(io.BytesIO(data), folder, count=300)
    (folder / ".ukbench00300.jpg.tmp").write_bytes(b"torn")
    td.fetch_test_data(dest, mirror=server.url, sums=sums, log=None)
    assert missing_parts(dest) == []
    regt = [p for p, _ in server.requests if not p.endswith(".zip")]
    assert len(regt) == gt_requests, "the ground truth was fetched again"


def test_a_wrong_checksum_names_the_file_and_publishes_nothing(
    tmp_path: Path, server: FileServer
) -> None:
    sums = _serve_all(server)
    name = next(n for n in sums if n.endswith(".txt"))
    wrong = dict(sums, **{name: "0" * 64})
    dest = tmp_path / "test-data"
    with pytest.raises(IntegrityError, match=f"{name} has sha256 .* expected 0000"):
        td.fetch_test_data(dest, mirror=server.url, sums=wrong, log=None)
    assert not dest.exists()
    # The bad file is fetched again by the next run (its archive's marker went with it).
    td.fetch_test_data(dest, mirror=server.url, sums=sums, log=None)
    assert missing_parts(dest) == []


def test_an_archive_without_the_images_is_refused(tmp_path: Path) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for n in range(10):
            archive.writestr(f"full/ukbench{n:05d}.jpg", _jpeg(n))
    with pytest.raises(IntegrityError, match="lacks 590 of its first 600 images"):
        td.extract_ukbench(out, tmp_path / "jpg")
    bad = io.BytesIO()
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("ukbench00000.jpg", b"not a jpeg")
    with pytest.raises(
        IntegrityError, match=r"ukbench00000\.jpg in ukbench\.zip is not a readable"
    ):
        td.extract_ukbench(bad, tmp_path / "jpg", count=1)
    assert not (tmp_path / "jpg" / "ukbench00000.jpg").exists()


def test_offline_is_one_line_saying_what_to_do(tmp_path: Path, capsys, monkeypatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("CW_PIPELINE_MIRROR", raising=False)
    code = main(
        ["download", "test-data", "--dest", str(tmp_path / "td"), "--timeout", "5",
         "--mirror", f"http://127.0.0.1:{port}"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot reach 127.0.0.1" in err and "Offline?" in err
    assert "the real-data tests are skipped" in err and len(err.strip().splitlines()) == 1


def test_the_shipped_checksums_are_the_shared_ground_truth(shared_data: Path) -> None:
    """``test_data.sha256`` lists every ground-truth file of the real data, and they match."""
    sums = td.expected_checksums()
    on_disk = {
        str(p.relative_to(shared_data))
        for p in (shared_data / "groundtruth").rglob("*")
        if p.is_file()
    }
    assert set(sums) == on_disk
    td.verify(shared_data)  # also: 600 UKBench images
