"""Where the real test data is: UKBench images and the official Oxford/Paris ground truth.

Searched in this order, the first complete folder wins:

1. ``$CW_SHARED_DATA`` (when set, it must be such a folder: a wrong path fails, never skips);
2. ``../shared/data`` beside the repository (the development machines and CI);
3. ``data/test-data/`` inside the repository (ignored by git; ``make test-data`` fetches it
   from the data's public sources).

When none holds it, the tests that need it are skipped and the run ends with one line saying
how many and which command enables them — unless ``$CW_REQUIRE_TEST_DATA`` is set (``.ci/run``
sets it), which turns missing data into a failure so CI never loses coverage silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PATH_ENV = "CW_SHARED_DATA"
REQUIRE_ENV = "CW_REQUIRE_TEST_DATA"
#: ``make test-data``'s folder, inside the repository's ignored data
IN_REPO = Path("data") / "test-data"
#: What a complete folder holds (``make test-data`` writes the same tree).
REQUIRED = (
    "ukbench/jpg/ukbench00000.jpg",
    "ukbench/jpg/ukbench00599.jpg",
    "groundtruth/oxford5k/gnd_oxford5k.pkl",
    "groundtruth/paris6k/gnd_paris6k.pkl",
    "groundtruth/revisited/gnd_roxford5k.pkl",
    "groundtruth/revisited/gnd_rparis6k.pkl",
)
#: Every skip for missing real data starts with this (the end-of-run line counts them).
SKIP_TAG = "real test data not found"
ENABLE_HINT = "`make test-data` fetches it into data/test-data/"
#: Where it is looked for, in order (the messages name them).
WHERE = f"${PATH_ENV}, ../shared/data, {IN_REPO}/"


@dataclass(frozen=True)
class Located:
    """The outcome of the search: the folder, or why there is none."""

    path: Path | None
    #: set when the data cannot be used and that is an error (a wrong ``$CW_SHARED_DATA``)
    error: str | None = None

    @property
    def required(self) -> bool:
        return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def missing_parts(folder: Path) -> list[str]:
    """The :data:`REQUIRED` files ``folder`` lacks (all of them when it is not a folder)."""
    return [part for part in REQUIRED if not (folder / part).is_file()]


def locate(repo: Path = REPO_ROOT) -> Located:
    """The first complete real-data folder of ``$CW_SHARED_DATA``, ``../shared/data``,
    ``data/test-data/``."""
    override = os.environ.get(PATH_ENV)
    if override:
        path = Path(override)
        missing = missing_parts(path)
        if missing:
            what = "is not a folder" if not path.is_dir() else f"lacks {', '.join(missing[:3])}"
            hint = "it must name the folder holding ukbench/ and groundtruth/"
            return Located(None, f"${PATH_ENV}={override} {what}: {hint}")
        return Located(path.resolve())
    for path in (repo / ".." / "shared" / "data", repo / IN_REPO):
        if not missing_parts(path):
            return Located(path.resolve())
    return Located(None)


def skip_reason() -> str:
    return f"{SKIP_TAG} ({WHERE}): {ENABLE_HINT}"


def required_reason() -> str:
    return (
        f"{SKIP_TAG} ({WHERE}) and ${REQUIRE_ENV} is set (CI): the real-data tests must "
        f"run; {ENABLE_HINT}"
    )
