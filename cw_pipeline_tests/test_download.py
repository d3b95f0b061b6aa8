"""`cw-pipeline download` against a local HTTP server serving tiny archives built here.

The server is :class:`cw_pipeline_tests.file_server.FileServer` (the ``server`` fixture).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import socket
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from cw_pipeline import download as dl
from cw_pipeline.cli import main
from cw_pipeline.config import dataset_location, load_config
from cw_pipeline.download import transfer
from cw_pipeline_tests.file_server import FileServer

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# the local server
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# tiny datasets
# --------------------------------------------------------------------------------------------


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def files_tar(files: dict[str, bytes]) -> bytes:
    return tar_bytes([(tarfile.TarInfo(name), data) for name, data in files.items()])


def gnd(imlist: list[str], qimlist: list[str], gnd_entries: list[dict]) -> bytes:
    """A gnd_*.pkl as the real ones are: plain lists and dicts, protocol 2."""
    data = {"gnd": gnd_entries, "imlist": imlist, "qimlist": qimlist}
    return pickle.dumps(data, protocol=2)


OX_IMAGES = {
    "all_souls_000001.jpg": jpeg(1),
    "all_souls_000002.jpg": jpeg(2),
    "ashmolean_000001.jpg": jpeg(3),
}
OX_GT = {
    "all_souls_1_query.txt": b"oxc1_all_souls_000001 1.0 1.0 7.0 7.0\n",
    "all_souls_1_good.txt": b"all_souls_000002\n",
    "all_souls_1_ok.txt": b"",
    "all_souls_1_junk.txt": b"ashmolean_000001\n",
}
PARIS_1 = {
    "paris/defense/paris_defense_000001.jpg": jpeg(4),
    "paris/defense/paris_defense_000002.jpg": jpeg(5),
}
PARIS_2 = {"paris/eiffel/paris_eiffel_000001.jpg": jpeg(6)}
PARIS_GT = {
    "defense_1_query.txt": b"paris_defense_000001 1.0 1.0 7.0 7.0\n",
    "defense_1_good.txt": b"",
    "defense_1_ok.txt": b"paris_defense_000002\n",
    "defense_1_junk.txt": b"paris_eiffel_000001\n",
}

OX = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
PA = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
CNN = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test"
REV = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
R1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg"


def serve_oxford(server: FileServer) -> dict[str, str]:
    ox_db = ["all_souls_000001", "all_souls_000002", "ashmolean_000001"]
    return {
        "images": server.serve(f"{OX}/oxbuild_images-v1.tgz", files_tar(OX_IMAGES)),
        "gt": server.serve(f"{OX}/gt_files_170407.tgz", files_tar(OX_GT)),
        "pkl": server.serve(
            f"{CNN}/oxford5k/gnd_oxford5k.pkl",
            gnd(
                ox_db, ["all_souls_000001"], [{"bbx": [1.0, 1.0, 7.0, 7.0], "ok": [1], "junk": [2]}]
            ),
        ),
        "rpkl": server.serve(
            f"{REV}/roxford5k/gnd_roxford5k.pkl",
            gnd(
                ox_db[1:],
                ["all_souls_000001"],
                [{"bbx": [1.0, 1.0, 7.0, 7.0], "easy": [0], "hard": [], "junk": [1]}],
            ),
        ),
    }


def serve_paris(server: FileServer) -> dict[str, str]:
    pa_db = ["paris_defense_000001", "paris_defense_000002", "paris_eiffel_000001"]
    return {
        "images1": server.serve(f"{PA}/paris_1-v1.tgz", files_tar(PARIS_1)),
        "images2": server.serve(f"{PA}/paris_2-v1.tgz", files_tar(PARIS_2)),
        "gt": server.serve(f"{PA}/paris_120310.tgz", files_tar(PARIS_GT)),
        "pkl": server.serve(
            f"{CNN}/paris6k/gnd_paris6k.pkl",
            gnd(pa_db, ["paris_defense_000001"], [{"bbx": [1, 1, 7, 7], "ok": [1], "junk": [2]}]),
        ),
        "rpkl": server.serve(
            f"{REV}/rparis6k/gnd_rparis6k.pkl",
            gnd(
                pa_db[1:],
                ["paris_defense_000001"],
                [{"bbx": [1, 1, 7, 7], "easy": [], "hard": [0], "junk": [1]}],
            ),
        ),
    }


def shipped_entries(*names: str) -> str:
    """The commented-out entries of the shipped ``data/datasets.yaml``, uncommented."""
    lines = (REPO_ROOT / "data" / "datasets.yaml").read_text().splitlines()
    out: list[str] = []
    for name in names:
        start = lines.index(f"#  {name}:")
        block = [lines[start]]
        for line in lines[start + 1 :]:
            if not line.startswith("#    "):
                break
            block.append(line)
        out += [line[1:] for line in block]
    return "\n".join(out) + "\n"


def write_config(folder: Path, entries: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "datasets.yaml"
    path.write_text(f"datasets:\n{entries}" if entries else "datasets: {}\n")
    return path


def run_cli(*args: str) -> int:
    return main(["download", *args])


# --------------------------------------------------------------------------------------------
# end to end: the shipped layout is usable right after the download
# --------------------------------------------------------------------------------------------


def test_download_fills_the_shipped_layout(tmp_path: Path, server: FileServer) -> None:
    from cw_pipeline.compute.queries import load_groundtruth
    from cw_pipeline.compute.shards import scan_files
    from cw_pipeline.core.datasets import validate_groundtruth

    ox, pa = serve_oxford(server), serve_paris(server)
    r1m = [
        server.serve(f"{R1M}/revisitop1m.{i}.tar.gz", files_tar({f"{i}/d{i}_7.jpg": jpeg(i)}))
        for i in (1, 2, 3)
    ]
    data = tmp_path / "data"
    # downloaded while the entries are still commented out, as the shipped file has them
    config = write_config(data)
    for name in ("oxford5k", "paris6k", "roxford5k", "rparis6k"):
        assert run_cli(name, "--config", str(config), "--mirror", server.url, "--quiet") == 0
    assert run_cli("distractors", "--config", str(config), "--mirror", server.url, "--quiet",
                   "--distractor-archives", "2") == 0  # fmt: skip

    # the revisited sets reuse the extracted images: only their pickles were fetched
    for path in (ox["images"], pa["images1"], pa["images2"]):
        assert server.requested(path) == [None]
    assert server.requested(r1m[2]) == []  # only the first two archives
    assert sorted(p.name for p in (data / "downloads").iterdir()) == []  # archives removed

    # now uncomment the shipped entries: the config loads and the datasets read
    names = ("oxford5k", "paris6k", "flickr100k", "roxford5k", "rparis6k")
    config = write_config(data, shipped_entries(*names))
    cfg = load_config(config)
    assert sorted(cfg.datasets) == sorted(names)
    found = {}
    for name in names:
        ds = cfg.dataset(name)
        files = scan_files(ds)
        found[name] = sorted(f.relpath for f in files)
        if ds.has_groundtruth:
            ids = [f.image_id for f in files]
            gt = load_groundtruth(ds, ids)
            assert validate_groundtruth(gt, ids) == []
            assert len(gt.queries) == 1 and gt.queries[0].bbox == (1.0, 1.0, 7.0, 7.0)
    assert found["oxford5k"] == sorted(OX_IMAGES)
    # Paris: paris/<landmark>/ becomes <landmark>/, so shard_by: folder gives one per landmark
    assert found["paris6k"] == [
        "defense/paris_defense_000001.jpg",
        "defense/paris_defense_000002.jpg",
        "eiffel/paris_eiffel_000001.jpg",
    ]
    assert found["flickr100k"] == ["revisitop1m.1/1/d1_7.jpg", "revisitop1m.2/2/d2_7.jpg"]
    assert (data / "oxford5k" / "jpg" / "all_souls_000002.jpg").read_bytes() == OX_IMAGES[
        "all_souls_000002.jpg"
    ]
    assert (data / "groundtruth" / "oxford5k" / "gnd_oxford5k.pkl").is_file()

    # a second run finds everything done (extraction markers) and asks the server nothing
    before = len(server.requests)
    for name in ("oxford5k", "paris6k", "roxford5k", "rparis6k"):
        assert run_cli(name, "--config", str(config), "--mirror", server.url, "--quiet") == 0
    assert run_cli("flickr100k", "--config", str(config), "--mirror", server.url, "--quiet",
                   "--distractor-archives", "2") == 0  # fmt: skip
    assert len(server.requests) == before


def test_configured_entry_decides_the_targets(tmp_path: Path, server: FileServer) -> None:
    serve_oxford(server)
    config = write_config(
        tmp_path / "cfg",
        "  oxford5k:\n    layout: gnd\n    images: ../elsewhere/ox\n"
        "    groundtruth: ../gt/mine.pkl\n    pca_from: other\n",
    )
    loc = dataset_location("oxford5k", config)
    assert loc is not None and loc.images == tmp_path / "elsewhere" / "ox"
    assert run_cli("oxford5k", "--config", str(config), "--mirror", server.url, "--quiet") == 0
    assert sorted(p.name for p in (tmp_path / "elsewhere" / "ox").iterdir()) == sorted(
        [*OX_IMAGES, ".oxbuild_images-v1.tgz.extracted"]
    )
    from cw_pipeline.core.datasets import load_gnd_pickle

    assert len(load_gnd_pickle(tmp_path / "gt" / "mine.pkl").queries) == 1
    # layout gnd needs no text ground truth: gt_files_170407.tgz was not fetched
    assert not any("gt_files" in p for p, _ in server.requests)


def test_root_uses_the_default_layout(tmp_path: Path, server: FileServer) -> None:
    serve_oxford(server)
    root = tmp_path / "elsewhere"
    assert run_cli("roxford5k", "--root", str(root), "--mirror", server.url, "--quiet") == 0
    assert (root / "oxford5k" / "jpg" / "ashmolean_000001.jpg").is_file()
    assert (root / "groundtruth" / "revisited" / "gnd_roxford5k.pkl").is_file()


# --------------------------------------------------------------------------------------------
# resuming
# --------------------------------------------------------------------------------------------


def _big_archive() -> bytes:
    import numpy as np

    noise = np.random.default_rng(0).bytes(300_000)  # incompressible: the archive stays big
    return files_tar({"all_souls_000009.jpg": noise, **OX_IMAGES})


def test_truncated_download_is_detected_and_resumed_next_run(
    tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    archive = _big_archive()
    path = server.serve(f"{OX}/oxbuild_images-v1.tgz", archive)
    serve_oxford(server)  # the ground truth
    server.files[path] = archive
    server.cut[path] = 100_000
    monkeypatch.setattr(transfer, "DEFAULT_RETRIES", 0)  # no resumption within the run
    config = write_config(tmp_path / "data")
    args = ("oxford5k", "--config", str(config), "--mirror", server.url, "--quiet")

    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "interrupted" in err and "run again to resume" in err
    part = tmp_path / "data" / "downloads" / "oxbuild_images-v1.tgz.part"
    assert part.stat().st_size == 100_000
    assert not (tmp_path / "data" / "oxford5k").exists()

    assert run_cli(*args, "--keep-archives") == 0
    assert server.requested(path) == [None, "bytes=100000-"]
    kept = tmp_path / "data" / "downloads" / "oxbuild_images-v1.tgz"
    assert kept.read_bytes() == archive and not part.exists()
    assert (tmp_path / "data" / "oxford5k" / "jpg" / "all_souls_000009.jpg").stat().st_size == (
        300_000
    )


def test_cut_connection_is_resumed_within_one_fetch(tmp_path: Path, server: FileServer) -> None:
    archive = _big_archive()
    path = server.serve(f"{OX}/oxbuild_images-v1.tgz", archive)
    server.cut[path] = 50_000
    res = dl.fetch(server.direct(path), tmp_path / "a.tgz", retries=2)
    assert res.attempts == 2 and res.size == len(archive)
    assert server.requested(path) == [None, "bytes=50000-"]
    assert (tmp_path / "a.tgz").read_bytes() == archive
    assert not (tmp_path / "a.tgz.part").exists()


def test_server_ignoring_range_restarts_cleanly(tmp_path: Path, server: FileServer) -> None:
    archive = _big_archive()
    path = server.serve(f"{OX}/x.tgz", archive)
    server.ignore_range = True
    (tmp_path / "a.tgz.part").write_bytes(b"stale bytes that are not the file")
    dl.fetch(server.direct(path), tmp_path / "a.tgz")
    assert server.requested(path) == ["bytes=33-"]
    assert (tmp_path / "a.tgz").read_bytes() == archive


def test_complete_part_answered_416_is_kept(tmp_path: Path, server: FileServer) -> None:
    path = server.serve(f"{OX}/x.tgz", b"0123456789")
    (tmp_path / "a.tgz.part").write_bytes(b"0123456789")
    res = dl.fetch(server.direct(path), tmp_path / "a.tgz")
    assert res.resumed_from == 10 and (tmp_path / "a.tgz").read_bytes() == b"0123456789"


def test_stale_longer_part_is_started_over(tmp_path: Path, server: FileServer) -> None:
    path = server.serve(f"{OX}/x.tgz", b"0123456789")
    (tmp_path / "a.tgz.part").write_bytes(b"an older, longer file")
    res = dl.fetch(server.direct(path), tmp_path / "a.tgz", retries=0)
    assert server.requested(path) == ["bytes=21-", None]  # 416, then a fresh transfer
    assert res.path.read_bytes() == b"0123456789"


def test_concurrent_download_of_the_same_file_is_refused(
    tmp_path: Path, server: FileServer
) -> None:
    import fcntl

    path = server.serve(f"{OX}/x.tgz", b"0123456789")
    with (tmp_path / "a.tgz.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(dl.DownloadError, match=r"another download of a\.tgz is running"):
            dl.fetch(server.direct(path), tmp_path / "a.tgz")
    assert server.requests == []
    dl.fetch(server.direct(path), tmp_path / "a.tgz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tgz"]  # lock file removed


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------


def test_checksum_mismatch_is_refused(
    tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    serve_oxford(server)
    url = f"{CNN}/oxford5k/gnd_oxford5k.pkl"
    monkeypatch.setitem(dl.KNOWN, url, dl.Known(sha256="0" * 64))
    config = write_config(tmp_path / "data", "  oxford5k:\n    layout: gnd\n"
                          "    images: ox\n    groundtruth: ox.pkl\n")  # fmt: skip
    assert run_cli("oxford5k", "--config", str(config), "--mirror", server.url, "--quiet") == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "does not match" in err and url.split("//")[1] in err
    assert not (tmp_path / "data" / "ox.pkl").exists()
    assert not (tmp_path / "data" / "ox.pkl.part").exists()


def test_size_mismatch_and_bad_content_are_refused(tmp_path: Path, server: FileServer) -> None:
    path = server.serve(f"{OX}/x.bin", b"abcdef")
    url = server.direct(path)
    with pytest.raises(dl.IntegrityError, match="6 bytes, expected 7"):
        dl.fetch(url, tmp_path / "x.bin", size=7)
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.part").exists()
    res = dl.fetch(url, tmp_path / "x.bin", size=6, sha256=hashlib.sha256(b"abcdef").hexdigest())
    assert res.path.read_bytes() == b"abcdef"
    # a ground-truth pickle that is not one: refused by the restricted loader
    path = server.serve(f"{CNN}/oxford5k/gnd_oxford5k.pkl", b"not a pickle")
    with pytest.raises(dl.IntegrityError, match="not a valid file"):
        dl.fetch(server.direct(path), tmp_path / "g.pkl", check=transfer.check_gnd)
    assert not (tmp_path / "g.pkl").exists()


def test_http_error_is_one_line(tmp_path: Path, server: FileServer, capsys) -> None:
    config = write_config(tmp_path / "data")
    assert run_cli("oxford5k", "--config", str(config), "--mirror", server.url, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HTTP 404" in err and "oxbuild_images-v1.tgz" in err


# --------------------------------------------------------------------------------------------
# safe extraction
# --------------------------------------------------------------------------------------------


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def _malicious(tmp_path: Path) -> dict[str, list[tuple[tarfile.TarInfo, bytes | None]]]:
    outside = tmp_path / "outside"
    return {
        "dotdot": [(_info("../evil"), b"x")],
        "nested-dotdot": [(_info("a/../../evil"), b"x")],
        "absolute": [(_info(str(outside / "evil")), b"x")],
        "symlink-out": [(_info("link", tarfile.SYMTYPE, "../../outside"), None)],
        "symlink-absolute": [(_info("link", tarfile.SYMTYPE, str(outside)), None)],
        "hardlink-out": [(_info("hl", tarfile.LNKTYPE, "../outside/secret"), None)],
        "hardlink-absolute": [(_info("hl", tarfile.LNKTYPE, str(outside / "secret")), None)],
        "through-symlink": [
            (_info("a", tarfile.SYMTYPE, "."), None),
            (_info("a/b", tarfile.SYMTYPE, ".."), None),
            (_info("a/b/evil"), b"x"),
        ],
        "fifo": [(_info("pipe", tarfile.FIFOTYPE), None)],
        "device": [(_info("dev", tarfile.CHRTYPE), None)],
    }


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


MALICIOUS = {  # case -> what the message says
    "dotdot": "member '../evil' contains '..'",
    "nested-dotdot": "member 'a/../../evil' contains '..'",
    "absolute": "has an absolute path",
    "symlink-out": "link 'link' points outside the target ('../../outside')",
    "symlink-absolute": "link 'link' points to the absolute path",
    "hardlink-out": "link 'hl' points outside the target ('../outside/secret')",
    "hardlink-absolute": "link 'hl' points to the absolute path",
    "through-symlink": "member 'a/b' lies under the link 'a'",
    "fifo": "member 'pipe' is a FIFO",
    "device": "member 'dev' is a device",
}


@pytest.mark.parametrize("data_filter", [True, False], ids=["data-filter", "own-checks-only"])
@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archive_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, data_filter: bool
) -> None:
    if not data_filter:  # as on Python < 3.11.4: the module's own checks must suffice
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("keep")
    members = [(_info("ok.jpg"), jpeg(1)), *_malicious(tmp_path)[case]]
    archive = tmp_path / "evil.tgz"
    archive.write_bytes(tar_bytes(members))
    target = tmp_path / "box" / "target"
    before = _tree(tmp_path)
    with pytest.raises(dl.UnsafeArchiveError) as info:
        dl.safe_extract(archive, target, marker=target / ".evil.tgz.extracted")
    assert MALICIOUS[case] in str(info.value) and str(info.value).endswith("; refused")
    # nothing written anywhere: not in the target (ok.jpg came first), not outside, no temp
    assert _tree(tmp_path) == before
    assert not target.exists()
    assert (tmp_path / "outside" / "secret").read_text() == "keep"


def test_malicious_archive_via_cli_exits_2(tmp_path: Path, server: FileServer, capsys) -> None:
    serve_oxford(server)
    server.serve(
        f"{OX}/oxbuild_images-v1.tgz",
        tar_bytes([(_info("ok.jpg"), jpeg(1)), (_info("../../evil.jpg"), jpeg(2))]),
    )
    config = write_config(tmp_path / "data")
    assert run_cli("oxford5k", "--config", str(config), "--mirror", server.url, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'../../evil.jpg' contains '..'; refused" in err
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "data" / "oxford5k").exists()


def test_safe_extract_keeps_inside_links_and_strips_prefix(tmp_path: Path) -> None:
    members = [
        (_info("paris"), None),
        (_info("paris/defense", tarfile.DIRTYPE), None),
        (_info("paris/defense/a.jpg"), b"a"),
        (_info("paris/defense/b.jpg", tarfile.SYMTYPE, "a.jpg"), None),
        (_info("paris/defense/c.jpg", tarfile.LNKTYPE, "paris/defense/a.jpg"), None),
    ]
    members[0][0].type = tarfile.DIRTYPE
    archive = tmp_path / "p.tgz"
    archive.write_bytes(tar_bytes(members))
    n = dl.safe_extract(archive, tmp_path / "t", strip_prefix="paris")
    assert n == 3
    assert (tmp_path / "t" / "defense" / "b.jpg").is_symlink()
    assert (tmp_path / "t" / "defense" / "b.jpg").read_bytes() == b"a"
    assert (tmp_path / "t" / "defense" / "c.jpg").read_bytes() == b"a"
    # flattening refuses symlinks (their targets would change) and name clashes
    with pytest.raises(dl.UnsafeArchiveError, match="flat"):
        dl.safe_extract(archive, tmp_path / "flat", flatten=True)
    clash = tmp_path / "clash.tgz"
    clash.write_bytes(files_tar({"x/a.jpg": b"1", "y/a.jpg": b"2"}))
    with pytest.raises(dl.IntegrityError, match=r"both extract to 'a\.jpg'"):
        dl.safe_extract(clash, tmp_path / "flat", flatten=True)
    assert not (tmp_path / "flat").exists()


def test_corrupt_archive_is_reported(tmp_path: Path) -> None:
    archive = tmp_path / "bad.tgz"
    archive.write_bytes(files_tar({"a.jpg": jpeg(1) * 20})[:200])
    with pytest.raises(dl.IntegrityError, match=r"bad\.tgz"):
        dl.safe_extract(archive, tmp_path / "t")
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------------------------------
# errors, dry run, mirror, progress
# --------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    port = _closed_port()
    config = write_config(tmp_path / "data")
    mirror = f"http://127.0.0.1:{port}"
    assert run_cli("rparis6k", "--config", str(config), "--mirror", mirror) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("cw-pipeline: error: cannot reach 127.0.0.1:")
    assert f"127.0.0.1:{port} (connection refused)" in err
    assert f"{mirror}/www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz" in err
    assert "Traceback" not in captured.err


def test_dry_run_fetches_nothing(tmp_path: Path, server: FileServer, capsys) -> None:
    serve_oxford(server)
    config = write_config(tmp_path / "data")
    part = tmp_path / "data" / "downloads" / "oxbuild_images-v1.tgz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 2048)
    assert run_cli("oxford5k", "--config", str(config), "--mirror", server.url, "--dry-run") == 0
    out = capsys.readouterr().out
    assert server.requests == []
    assert _tree(tmp_path / "data") == {"datasets.yaml", "downloads", "downloads/" + part.name}
    assert f"{server.url}/www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz" in out
    assert f"into {tmp_path / 'data' / 'oxford5k' / 'jpg'}" in out
    assert f"-> {tmp_path / 'data' / 'groundtruth' / 'oxford5k' / 'gnd_oxford5k.pkl'}" in out
    assert "[resume at 2.0 KiB]" in out and "3 of 3 files to fetch or extract" in out
    assert "default layout" in out


def test_dry_run_official_sources_and_distractor_count(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "data")
    assert run_cli("flickr100k", "--config", str(config), "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"{R1M}/revisitop1m.10.tar.gz" in out and "revisitop1m.11." not in out
    assert run_cli("flickr100k", "--config", str(config), "--dry-run",
                   "--distractor-archives", "12") == 0  # fmt: skip
    assert "revisitop1m.12.tar.gz" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["oxford5k", "--distractor-archives", "3"], "applies to flickr100k only"),
        (["flickr100k", "--distractor-archives", "0"], "must be in 1..100"),
        (["demo-a"], "no download source for 'demo-a'"),
        (["oxford5k", "--mirror", "ftp://host/x"], "must be an http(s) URL"),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    config = write_config(tmp_path / "data")
    assert run_cli(*args, "--config", str(config), "--dry-run") == 2
    assert message in capsys.readouterr().err


def test_configured_layout_must_fit(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "data", "  roxford5k:\n    layout: oxford\n"
                          "    images: ox\n    groundtruth: gt\n")  # fmt: skip
    assert run_cli("roxford5k", "--config", str(config), "--dry-run") == 2
    assert "has layout 'oxford'; the download provides layout 'revisited' or 'gnd'" in (
        capsys.readouterr().err
    )


def test_mirror_mapping_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{OX}/oxbuild_images-v1.tgz"
    assert dl.apply_mirror(url, None) == url
    assert (
        dl.apply_mirror(url, "http://m:8/pub/")
        == "http://m:8/pub/www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"
    )
    monkeypatch.setenv(dl.MIRROR_ENV, "http://env:1")
    assert dl.resolve_mirror(None) == "http://env:1"
    assert dl.resolve_mirror("http://cli:2") == "http://cli:2"
    monkeypatch.setenv(dl.MIRROR_ENV, "not a url")
    with pytest.raises(ValueError, match=r"\$CW_PIPELINE_MIRROR"):
        dl.resolve_mirror(None)


def test_progress_bar_shows_rate_only_when_enabled(tmp_path: Path, server: FileServer) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    path = server.serve(f"{OX}/x.bin", b"z" * 5000)
    url = server.direct(path)
    stream = Tty()
    dl.fetch(url, tmp_path / "x.bin", progress=True, progress_stream=stream, label="x.bin")
    shown = stream.getvalue()
    assert "x.bin" in shown and "B/s" in shown and "100%" in shown
    quiet = io.StringIO()
    dl.fetch(url, tmp_path / "y.bin", progress=False, progress_stream=quiet)
    assert quiet.getvalue() == ""
