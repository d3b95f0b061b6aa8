"""Download the public benchmarks into the configured layout (no Dagster).

``cw-pipeline download NAME`` fetches one catalogue entry from its official sources (listed in
the paper notes) and leaves it where ``data/datasets.yaml`` expects it:

=============  ==============================================================================
``oxford5k``   ``oxbuild_images-v1.tgz`` (flat) + ground truth: ``gt_files_170407.tgz`` and
               ``gnd_oxford5k.pkl`` (layout ``oxford``) or the pickle alone (layout ``gnd``)
``paris6k``    ``paris_1-v1.tgz``, ``paris_2-v1.tgz`` (``paris/<landmark>/`` →
               ``<images>/<landmark>/``) + ``paris_120310.tgz`` and ``gnd_paris6k.pkl``
``roxford5k``  the Oxford images + ``gnd_roxford5k.pkl`` (layout ``revisited``)
``rparis6k``   the Paris images + ``gnd_rparis6k.pkl``
``flickr100k`` the first N (default 10, i.e. 100k images) ``revisitop1m.<i>.tar.gz`` archives
               of the Revisited 1M distractors, each into ``<images>/revisitop1m.<i>/``
=============  ==============================================================================

The text ground truth (``gt_files_170407.tgz``, ``paris_120310.tgz``) is not in the paper
notes' list; it comes from the same official VGG pages as the images, and the ``oxford`` /
``paris`` layouts of the shipped config read it. The distractors are the Revisited 1M images
(the original Oxford 100k Flickr set has no archive among the listed sources).

Targets: when the config file defines a dataset named NAME, its ``images`` and ``groundtruth``
are used (read with :func:`cw_pipeline.config.dataset_location`, which does not require them to
exist). Otherwise — the entries ship commented out — the *default layout* is used: the paths of
the commented entries in ``data/datasets.yaml``, relative to the config file's folder (or to
``root``); uncomment the entry afterwards.

Transfer: resumable, into ``<file>.part`` with HTTP ``Range`` requests (a cut connection is
retried from where it stopped, a later run resumes a kept ``.part``); the result is checked
against the server's length, against :data:`KNOWN` sizes/sha256 where they are known (nothing
is known for these sources yet: unknown values are skipped and the computed sha256 is
printed), ground-truth pickles are loaded with the restricted unpickler; then the file is
renamed atomically. Archives are extracted with :func:`safe_extract` into a temporary folder
beside the target and moved in; a hidden marker ``.<archive>.extracted`` makes later runs skip
them. All failures raise :class:`DownloadError` (an ``OSError``), whose message is one line.

Mirror (``--mirror URL`` or ``$CW_PIPELINE_MIRROR``): each source ``scheme://host/path`` is
fetched from ``URL/host/path`` — the tree ``wget -x`` (or ``wget --mirror``) writes, served by
any HTTP server.

The package: :mod:`~cw_pipeline.download.sources` (the catalogue),
:mod:`~cw_pipeline.download.plan` (what to fetch, where), :mod:`~cw_pipeline.download.transfer`
(one resumable, verified transfer), :mod:`~cw_pipeline.download.archives` (safe extraction),
:mod:`~cw_pipeline.download.run` (a plan carried out) and :mod:`~cw_pipeline.download.errors`;
this module is their public surface.
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
