"""Distractor-scale indexing through the Dagster pipeline: 100,000 small images in 100 shards.

Usage: python benchmarks/scale_100k.py [--images 100000] [--shards 100] [--size 64]
                                       [--watch-seconds 90] [--keep DIR]

1. Generates ``--images`` synthetic JPEGs (``--size`` pixels square: coloured shapes on a
   gradient, each image different) in one folder.
2. Indexes them with :func:`cw_pipeline.runtime.runs.index_dataset` — manifest + cam_features, one
   Dagster run per shard, on a persistent (SQLite) instance in a temporary ``DAGSTER_HOME``,
   with ``fixed:<size>x<size>`` resizing so that it finishes in well under an hour on 2 cores.
3. Starts ``dagster-webserver`` and ``dagster-daemon`` on that instance (loopback), asks the
   webserver for the asset graph and the sensors' ticks over GraphQL, and samples both
   processes' peak RSS (with their children) for ``--watch-seconds``.

Prints images/s (end to end and inside the features steps), the orchestration overhead per
shard (wall time minus the steps' own time, per shard), the time of one automation evaluation
over the 100-partition graph, and the peak memory of every process involved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cw_pipeline.runtime.instance import INSTANCE_YAML

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

CONFIG = """
warehouse: {root}/warehouse
reports: {root}/reports
defaults:
  resize: fixed:{size}x{size}
  batch_size: 64
datasets:
  synthetic:
    layout: folder
    images: {root}/jpg
    shard_by: batch
    shard_size: {shard_size}
methods: [ofa]
"""


def generate(folder: Path, n: int, size: int, seed: int = 0) -> float:
    """Write ``n`` distinct small JPEGs; returns seconds taken."""
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    for i in range(n):
        a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
        grad = a[None, None] + (b - a)[None, None] * ramp[None, :, None]
        img = Image.fromarray(np.broadcast_to(grad, (size, size, 3)).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x1, y1 = (int(v) for v in rng.integers(0, size - 8, size=2))
            w, h = (int(v) for v in rng.integers(6, size // 2, size=2))
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            if rng.random() < 0.5:
                draw.rectangle((x1, y1, x1 + w, y1 + h), fill=colour)
            else:
                draw.ellipse((x1, y1, x1 + w, y1 + h), fill=colour)
        img.save(folder / f"img_{i:06d}.jpg", quality=85)
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeakRSS(threading.Thread):
    """Samples the RSS of processes (and their children) every ``interval`` seconds."""

    def __init__(self, procs: dict[str, int], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval = procs, interval
        self.peak = dict.fromkeys(procs, 0)
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil  # only where process trees are watched (the generator needs none)

        while not self._halt.is_set():
            for name, pid in self.pids.items():
                try:
                    p = psutil.Process(pid)
                    rss = p.memory_info().rss + sum(
                        c.memory_info().rss for c in p.children(recursive=True)
                    )
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak[name], rss)
            self._halt.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join()
        return self.peak


def _loopback(port: int) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(port)]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"GraphQL {exc.code}: {exc.read()[:500]!r}") from None


def _wait_up(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster-webserver exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
                return
        except OSError:
            time.sleep(1.0)
    raise TimeoutError("dagster-webserver did not answer in time")


TICKS = """{ repositoriesOrError { ... on RepositoryConnection { nodes { sensors { name
  sensorState { ticks(limit: 20) { status timestamp endTimestamp } } } } } } }"""
ASSETS = "{ assetNodes { assetKey { path } } }"


def watch_services(env: dict, seconds: float) -> dict:
    """Webserver + daemon on the instance: peak RSS, asset-graph query time, sensor ticks."""
    port = _free_port()
    log = open(Path(env["DAGSTER_HOME"]) / "services.log", "w")
    web = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-m", "cw_pipeline.definitions", *_loopback(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-m", "cw_pipeline.definitions"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    sampler = PeakRSS({"webserver": web.pid, "daemon": daemon.pid})
    sampler.start()
    out: dict = {}
    try:
        _wait_up(port, web)
        t0 = time.perf_counter()
        nodes = _graphql(port, ASSETS)["data"]["assetNodes"]
        out["asset_graph_query_s"] = time.perf_counter() - t0
        out["asset_nodes"] = len(nodes)
        time.sleep(seconds)
        ticks: dict[str, list[float]] = {}
        repos = _graphql(port, TICKS)["data"]["repositoriesOrError"]["nodes"]
        for s in (sensor for repo in repos for sensor in repo["sensors"]):
            done = [t for t in s["sensorState"]["ticks"] if t.get("endTimestamp")]
            ticks[s["name"]] = [t["endTimestamp"] - t["timestamp"] for t in done]
        out["tick_seconds"] = ticks
    finally:
        try:
            peak = sampler.stop()
        finally:
            _stop(web, daemon)
        log.close()
    out["peak_rss"] = peak
    return out


def _stop(*procs: subprocess.Popen) -> None:
    """TERM each process group, then KILL what is left after 30 s."""
    for p in procs:
        try:
            os.killpg(p.pid, 15)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (and input size)")
    ap.add_argument("--watch-seconds", type=float, default=90.0)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: temp)")
    args = ap.parse_args()
    import psutil

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, python {platform.python_version()}"
    )
    work = args.keep or Path(tempfile.mkdtemp(prefix="cw_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def prepare_project(work: Path, config: str, args: argparse.Namespace) -> Path:
    """Write ``config`` (formatted with the work folder, image size and shard size) and a
    Dagster instance under ``work``, and point this process at them; returns the config."""
    shard_size = -(-args.images // args.shards)
    cfg = work / "datasets.yaml"
    cfg.write_text(config.format(root=work, size=args.size, shard_size=shard_size))
    home = work / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text((ROOT / INSTANCE_YAML).read_text())
    os.environ.update(DAGSTER_HOME=str(home), CW_PIPELINE_CONFIG=str(cfg))
    return cfg


def run(args: argparse.Namespace, work: Path) -> None:
    cfg = prepare_project(work, CONFIG, args)

    existing = len(list((work / "jpg").glob("*.jpg"))) if (work / "jpg").is_dir() else 0
    if existing != args.images:
        shutil.rmtree(work / "jpg", ignore_errors=True)
        gen = generate(work / "jpg", args.images, args.size)
        print(f"generated {args.images} images of {args.size}×{args.size} in {gen:.1f} s")

    import dagster as dg  # after DAGSTER_HOME is set

    from cw_pipeline.config import load_config
    from cw_pipeline.defs.graph import build_definitions
    from cw_pipeline.runtime.runs import console_log_level, index_dataset
    from cw_pipeline.store import FeatureStore

    config = load_config(cfg)
    defs = build_definitions(config)
    store = FeatureStore(config.warehouse)
    with dg.DagsterInstance.get() as instance, console_log_level("WARNING"):
        t0 = time.perf_counter()
        res = index_dataset(defs, instance, config, "synthetic", store)
        wall = time.perf_counter() - t0
        n_runs = len(res.indexed_shards)
        if not n_runs:
            raise SystemExit(f"nothing to index in {work} (already indexed): use a new --keep")
        overhead = (wall - res.feature_seconds) / max(n_runs, 1)
        print(
            f"indexed {res.images} images in {res.shards} shards ({n_runs} runs): "
            f"{res.forward_passes} forward passes, {res.rejected} rejected"
        )
        print(
            f"wall {wall:.1f} s = {res.images / wall:.1f} img/s end to end; features steps "
            f"{res.feature_seconds:.1f} s = {res.forward_passes / res.feature_seconds:.1f} img/s"
        )
        print(
            f"orchestration overhead (wall − features steps) per shard: {overhead:.2f} s "
            f"({100 * (wall - res.feature_seconds) / wall:.1f} % of the wall time)"
        )
        t0 = time.perf_counter()
        again = index_dataset(defs, instance, config, "synthetic", store)
        print(
            f"unchanged re-index (scan {res.images} files, plan, no runs): "
            f"{time.perf_counter() - t0:.1f} s, {len(again.indexed_shards)} runs"
        )
        cursor = None
        for i in range(2):
            t0 = time.perf_counter()
            ev = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
            cursor = ev.cursor
            print(
                f"automation evaluation {i + 1} over {res.shards} partitions: "
                f"{time.perf_counter() - t0:.2f} s, {ev.total_requested} requested"
            )
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the indexing process: {peak_self:.0f} MiB")
    size = sum(p.stat().st_size for p in (work / "warehouse").rglob("*") if p.is_file())
    print(
        f"feature store: {size / 2**20:.0f} MiB ({size / max(res.images, 1) / 1024:.1f} KB/image)"
    )

    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    svc = watch_services(env, args.watch_seconds)
    print(
        f"webserver: asset graph ({svc['asset_nodes']} nodes) over GraphQL in "
        f"{svc['asset_graph_query_s']:.2f} s"
    )
    for name, rss in svc["peak_rss"].items():
        print(
            f"peak RSS {name} (with children) over {args.watch_seconds:.0f} s: "
            f"{rss / 2**20:.0f} MiB"
        )
    for name, ticks in svc["tick_seconds"].items():
        if ticks:
            print(
                f"daemon ticks of {name}: {len(ticks)}, median {np.median(ticks):.2f} s, "
                f"max {max(ticks):.2f} s"
            )


if __name__ == "__main__":
    main()
