"""Child processes for the crash and concurrency tests (``python -m cw_pipeline_tests.faults``).

Test-only fault injection lives here, never in the package: the child patches the library in its
own process before running it.

``index CONFIG DATASET --log FILE [--kill-after-batches N | --kill-at-publish] [--start-after F]``
    Index every shard of ``DATASET`` (manifest + features, through Dagster, like
    ``cw-pipeline index --force --no-refresh``) in a fresh ephemeral instance. Every forward
    pass appends one line to ``--log``: the JSON list of the image ids of its batch.
    ``--kill-after-batches N``: SIGKILL itself right after the forward pass of batch N + 1,
    before that batch is checkpointed (so N batches are checkpointed, one is lost).
    ``--kill-at-publish``: SIGKILL itself when the finished feature shard is about to be
    renamed into place (the hidden temporary file is complete, the shard not replaced yet).
    ``--start-after F``: after start-up, create ``F.<pid>.ready`` and wait for file ``F`` (the
    parent creates it once every child is ready, so that their runs overlap).
    On success, prints one JSON line: the ``IndexResult``.

``cli --log FILE [--kill-after-batches N] [--kill-in-rankings] -- ARGS...``
    Run ``cw-pipeline ARGS...`` (the CLI's ``main``) in this process with the same forward-pass
    log and ``--kill-after-batches``; ``--kill-in-rankings``: SIGKILL itself when an evaluation's
    rankings step starts computing them.

``write TABLE_ROOT RELPATH --tag TAG --rows N --iterations K [--start-after F]``
    Write a table of ``N`` rows tagged ``TAG`` at ``RELPATH`` ``K`` times (no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def tagged_table(tag: str, rows: int):
    """The table a ``write`` child writes: ``rows`` rows, every value derived from ``tag``."""
    import numpy as np
    import pyarrow as pa

    seed = sum(tag.encode())
    values = np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)
    flat = pa.array(values.reshape(-1), pa.float32())
    return pa.table(
        {
            "image_id": pa.array([f"{tag}-{i:05d}" for i in range(rows)], pa.string()),
            "v": pa.FixedSizeListArray.from_arrays(flat, 64),
        }
    )


def _wait_for(path: str | None, timeout: float = 300.0) -> None:
    """Announce readiness (``<path>.<pid>.ready``), then wait until ``path`` exists."""
    if not path:
        return
    Path(f"{path}.{os.getpid()}.ready").touch()
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"start file {path} never appeared")
        time.sleep(0.01)


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _instrument(log: Path, kill_after_batches: int | None, kill_at_publish: bool) -> None:
    from cw_pipeline.core.extract import FeatureExtractor
    from cw_pipeline.store import feature_store

    original_flush = FeatureExtractor._flush
    batches = [0]

    def flush(self, bucket):
        records = list(original_flush(self, bucket))  # the forward pass
        batches[0] += 1
        with open(log, "a", encoding="utf-8") as fh:  # in the page cache: survives SIGKILL
            fh.write(json.dumps([b[0] for b in bucket]) + "\n")
        if kill_after_batches is not None and batches[0] > kill_after_batches:
            _die()
        yield from records

    FeatureExtractor._flush = flush  # type: ignore[method-assign]

    if kill_at_publish:
        real_replace = os.replace

        def replace(src, dst):
            dst = str(dst)
            if "/cam_features/dataset=" in dst and "/_checkpoints/" not in dst:
                _die()
            real_replace(src, dst)

        feature_store.os.replace = replace  # type: ignore[attr-defined]


def _cli(args: argparse.Namespace) -> None:
    from cw_pipeline.cli import main as cli_main
    from cw_pipeline.defs.assets import rankings as ranking_assets

    _instrument(Path(args.log), args.kill_after_batches, False)
    if args.kill_in_rankings:

        def rankings(*_args, **_kwargs):
            _die()

        ranking_assets.evaluation_rankings = rankings  # type: ignore[assignment]
    argv = args.cli_args[1:] if args.cli_args[:1] == ["--"] else args.cli_args
    sys.exit(cli_main(argv))


def _index(args: argparse.Namespace) -> None:
    import dagster as dg

    from cw_pipeline.config import load_config
    from cw_pipeline.defs.graph import build_definitions
    from cw_pipeline.runtime.runs import index_dataset
    from cw_pipeline.store import FeatureStore

    _instrument(Path(args.log), args.kill_after_batches, args.kill_at_publish)
    config = load_config(Path(args.config))
    defs = build_definitions(config)
    instance = dg.DagsterInstance.ephemeral()
    _wait_for(args.start_after)
    result = index_dataset(
        defs, instance, config, args.dataset, FeatureStore(config.warehouse), force=True
    )
    print(json.dumps(result.as_dict()), flush=True)


def _write(args: argparse.Namespace) -> None:
    from cw_pipeline.store import FeatureStore

    store = FeatureStore(args.root)
    table = tagged_table(args.tag, args.rows)
    _wait_for(args.start_after)
    for _ in range(args.iterations):
        store.write_table(args.relpath, table, metadata={"writer": args.tag})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cw_pipeline_tests.faults")
    sub = parser.add_subparsers(dest="mode", required=True)
    ix = sub.add_parser("index")
    ix.add_argument("config")
    ix.add_argument("dataset")
    ix.add_argument("--log", required=True)
    ix.add_argument("--kill-after-batches", type=int, default=None)
    ix.add_argument("--kill-at-publish", action="store_true")
    ix.add_argument("--start-after", default=None)
    cl = sub.add_parser("cli")
    cl.add_argument("--log", required=True)
    cl.add_argument("--kill-after-batches", type=int, default=None)
    cl.add_argument("--kill-in-rankings", action="store_true")
    cl.add_argument("cli_args", nargs=argparse.REMAINDER)
    wr = sub.add_parser("write")
    wr.add_argument("root")
    wr.add_argument("relpath")
    wr.add_argument("--tag", required=True)
    wr.add_argument("--rows", type=int, default=100)
    wr.add_argument("--iterations", type=int, default=50)
    wr.add_argument("--start-after", default=None)
    args = parser.parse_args(argv)
    {"index": _index, "cli": _cli, "write": _write}[args.mode](args)


if __name__ == "__main__":
    main()
