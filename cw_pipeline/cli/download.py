"""``cw-pipeline download``: its arguments and the call into :mod:`cw_pipeline.download`, which
fetches a benchmark from its official sources into the configured layout."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cw_pipeline import download
from cw_pipeline.cli.common import CLIError
from cw_pipeline.cli.progress import bars_enabled


def add_parser(sub: Any) -> None:
    """The ``download`` sub-command."""
    names = ", ".join([*download.CATALOGUE, *download.ALIASES, "test-data"])
    dl = sub.add_parser(
        "download",
        help="fetch Oxford5k, Paris6k, their ground truth or the distractors",
        description="Download a benchmark from its official sources into the layout of its "
        "entry in the datasets YAML (or, while the entry is commented out, the layout that "
        "entry would use): resumable, verified, safely extracted.",
    )
    dl.add_argument("name", metavar="NAME", help=f"one of: {names}")
    dl.add_argument("--config", type=Path, default=None, help="datasets YAML")
    dl.add_argument(
        "--root",
        type=Path,
        default=None,
        help="use the default layout under this folder instead of the config's",
    )
    dl.add_argument(
        "--mirror",
        default=None,
        help=f"fetch scheme://host/path from MIRROR/host/path instead (or ${download.MIRROR_ENV})",
    )
    dl.add_argument(
        "--distractor-archives",
        type=int,
        default=None,
        metavar="N",
        help="flickr100k: how many 10k-image revisitop1m archives (default 10, at most 100)",
    )
    dl.add_argument("--dry-run", action="store_true", help="print what would be fetched, where")
    dl.add_argument("--quiet", action="store_true", help="no progress bars or step lines")
    dl.add_argument("--keep-archives", action="store_true", help="keep archives once extracted")
    dl.add_argument(
        "--timeout",
        type=float,
        default=download.DEFAULT_TIMEOUT,
        help="seconds to connect / per read",
    )
    dl.add_argument("--cache", type=Path, default=None, help="archive folder (default: downloads/)")
    dl.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="test-data: the folder to build (default: the project's data/test-data/, where the "
        "tests look for it)",
    )
    dl.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> dict[str, Any] | None:
    """Fetch the named benchmark (or, with ``--dry-run``, print what would be fetched)."""
    if args.timeout <= 0:
        raise CLIError(f"--timeout must be positive, got {args.timeout}")
    if args.name == "test-data":
        return _test_data(args)
    plan = download.plan_download(
        args.name,
        config=args.config,
        root=args.root,
        mirror=download.resolve_mirror(args.mirror),
        distractor_archives=args.distractor_archives,
        cache=args.cache,
    )
    if args.dry_run:
        print("\n".join(download.describe_plan(plan)))
        return None
    download.run_plan(
        plan,
        progress=bars_enabled(args.quiet),
        log=None if args.quiet else print,
        keep_archives=args.keep_archives,
        timeout=args.timeout,
    )
    return None


def _test_data(args: argparse.Namespace) -> None:
    """``download test-data``: the real test data (:mod:`cw_pipeline.download.test_data`)."""
    from cw_pipeline.config import project_root
    from cw_pipeline.download import test_data

    dest = args.dest or project_root() / "data" / "test-data"
    mirror = download.resolve_mirror(args.mirror)
    if args.dry_run:
        print("\n".join(test_data.describe(dest, mirror)))
        return None
    test_data.fetch_test_data(
        dest, mirror=mirror, timeout=args.timeout, log=None if args.quiet else print
    )
    return None
