"""Download the public benchmarks into the configured layout (no Dagster).

``cw-pipeline download NAME`` fetches one catalogue entry (Oxford5k, Paris6k, their revisited
ground truth, the Revisited 1M distractors; README's "Datasets" lists them) from its official
sources and leaves it where ``data/datasets.yaml`` expects it. Every failure is a
:class:`DownloadError` (an ``OSError``) whose message is one line naming the file or URL.

Modules, in the order a download goes through them: :mod:`.sources` (the catalogue),
:mod:`.plan` (what to fetch and where: the YAML's paths or the default layout, a mirror),
:mod:`.transfer` (one resumable, verified transfer), :mod:`.archives` (safe extraction),
:mod:`.run` (a plan carried out), :mod:`.errors`; :mod:`.test_data` fetches the suite's real
test data (``make test-data``). This module is their public surface.
"""

from cw_pipeline.download.archives import safe_extract
from cw_pipeline.download.errors import (
    DownloadError,
    HostUnreachableError,
    IntegrityError,
    UnsafeArchiveError,
)
from cw_pipeline.download.plan import (
    MIRROR_ENV,
    DownloadPlan,
    Item,
    apply_mirror,
    describe_plan,
    plan_download,
    resolve_mirror,
)
from cw_pipeline.download.run import run_plan
from cw_pipeline.download.sources import (
    ALIASES,
    CATALOGUE,
    DEFAULT_DISTRACTOR_ARCHIVES,
    KNOWN,
    Known,
)
from cw_pipeline.download.transfer import DEFAULT_TIMEOUT, FetchResult, fetch

__all__ = [
    "ALIASES",
    "CATALOGUE",
    "DEFAULT_DISTRACTOR_ARCHIVES",
    "DEFAULT_TIMEOUT",
    "KNOWN",
    "MIRROR_ENV",
    "DownloadError",
    "DownloadPlan",
    "FetchResult",
    "HostUnreachableError",
    "IntegrityError",
    "Item",
    "Known",
    "UnsafeArchiveError",
    "apply_mirror",
    "describe_plan",
    "fetch",
    "plan_download",
    "resolve_mirror",
    "run_plan",
    "safe_extract",
]
