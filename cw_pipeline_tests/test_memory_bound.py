"""Indexing memory is bounded by the settings, not by the images (huge-but-legal inputs).

The big test runs a child process whose address space is limited (``RLIMIT_AS``) to what it
had after loading the network plus 1 GiB, and indexes a 9400×9400 one-bit PNG (about 50 KB,
under Pillow's bomb limit) with the default settings: before the cap and the pixel budget,
its forward pass alone needed about 29 GB.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from cw_pipeline.compute.features import dataset_extractor, update_features
from cw_pipeline.compute.manifests import build_manifest
from cw_pipeline.compute.shards import scan_files
from cw_pipeline.config import DatasetConfig
from cw_pipeline.core.extract import DEFAULT_BATCH_PIXELS, ExtractionConfig, RuntimeConfig

ROOT = Path(__file__).resolve().parents[1]
HEADROOM = 1 << 30  # bytes of address space allowed beyond the loaded network
BIG = 9400


def _one_bit_png(path: Path, side: int = BIG) -> Path:
    """A large, highly compressible 1-bit PNG (stripes and discs)."""
    img = Image.new("1", (side, side), 0)
    draw = ImageDraw.Draw(img)
    for i in range(0, side, 400):
        draw.rectangle((i, i, i + 3000, i + 200), fill=1)
        draw.ellipse((i, side - i - 600, i + 600, side - i), fill=1)
    img.save(path, optimize=True)
    return path


def _dataset(
    folder: Path, name: str, resize: str = "max:1024", batch_pixels: int | None = None
) -> DatasetConfig:
    runtime = RuntimeConfig() if batch_pixels is None else RuntimeConfig(batch_pixels=batch_pixels)
    extraction = ExtractionConfig(resize=resize)
    return DatasetConfig(
        name=name, layout="folder", images=folder, extraction=extraction, runtime=runtime
    )


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def _child(folder: str, warmup: str) -> None:
    """Index ``folder`` with the default settings and with ``native``, under RLIMIT_AS."""
    runs = {
        "default": _dataset(Path(folder), "big"),
        "native": _dataset(Path(folder), "big_native", resize="native"),
    }
    extractors = {k: dataset_extractor(ds) for k, ds in runs.items()}
    manifests = {k: build_manifest(ds, scan_files(ds))[0] for k, ds in runs.items()}
    for ext in extractors.values():  # start torch's and the decoders' threads
        list(ext.extract_files([("warmup", warmup)]))
    limit = _vm_size() + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    out: dict = {"limit": limit}
    for key, ds in runs.items():
        try:
            up = update_features(ds, manifests[key], None, extractors[key])
        except BaseException as exc:  # reported to the test, which fails on it
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out[key] = {
            "rows": up.table.select(["image_id", "input_w", "input_h", "grid_w"]).to_pylist(),
            "manifest": manifests[key].select(["image_id", "width", "height"]).to_pylist(),
            "rejected": up.rejected.to_pylist(),
        }
    print(json.dumps(out), flush=True)


def test_a_9400px_one_bit_png_is_indexed_within_a_memory_limit(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    big = _one_bit_png(folder / "big.png")
    assert big.stat().st_size < 100_000 and BIG * BIG < Image.MAX_IMAGE_PIXELS
    Image.new("RGB", (320, 240), (20, 120, 200)).save(folder / "small.jpg")
    warmup = tmp_path / "warmup.jpg"
    Image.new("RGB", (320, 240), (200, 120, 20)).save(warmup)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "2"}
    code = (
        "import sys\nfrom cw_pipeline_tests.test_memory_bound import _child\n_child(*sys.argv[1:])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(warmup)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Default settings (max:1024): both images indexed within the limit, the big one at
    # 1024x1024; nothing rejected.
    default = out["default"]
    assert "error" not in default, default
    assert default["rejected"] == []
    rows = {r["image_id"]: r for r in default["rows"]}
    assert set(rows) == {"big", "small"}
    assert (rows["big"]["input_w"], rows["big"]["input_h"]) == (1024, 1024)
    assert rows["big"]["grid_w"] == 1024 // 32
    assert {r["image_id"]: (r["width"], r["height"]) for r in default["manifest"]} == {
        "big": (BIG, BIG),
        "small": (320, 240),
    }
    assert (rows["small"]["input_w"], rows["small"]["input_h"]) == (320, 240)
    # `native`: the big image cannot fit the pixel budget; it is quarantined from its header
    # with a reason naming the file, its size and the budget, still within the limit.
    native = out["native"]
    assert "error" not in native, native
    assert [r["image_id"] for r in native["rows"]] == ["small"]
    (rej,) = native["rejected"]
    assert rej["image_id"] == "big" and rej["relpath"] == "big.png"
    reason = rej["reason"]
    assert str(big) in reason and f"{BIG}x{BIG}" in reason and f"{BIG * BIG} px" in reason
    assert f"{DEFAULT_BATCH_PIXELS} px, batch_pixels" in reason


def test_an_image_over_the_pixel_budget_is_quarantined_and_the_shard_proceeds(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (400, 300), (200, 30, 30)).save(folder / "poster.png")
    Image.new("RGB", (96, 64), (30, 30, 200)).save(folder / "thumb.png")
    ds = _dataset(folder, "budget", resize="native", batch_pixels=100_000)
    manifest, _ = build_manifest(ds, scan_files(ds))
    up = update_features(ds, manifest, None, dataset_extractor(ds))
    assert up.table.column("image_id").to_pylist() == ["thumb"]
    (rej,) = up.rejected.to_pylist()
    assert rej["image_id"] == "poster"
    assert "poster.png" in rej["reason"] and "400x300 = 120000 px" in rej["reason"]
    assert "(100000 px, batch_pixels)" in rej["reason"]
    assert up.errors == [("poster", rej["reason"])]
