"""The catalogue of downloadable benchmarks: their official URLs (Oxford5k, Paris6k, the
classic and revisited ground truth, the revisitop1m distractors), the archives of each entry and
the layout they provide, the aliases, the verified facts (:data:`KNOWN`) about source files,
and the sources of the real test data (``test-data``).

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
(the original Oxford 100k Flickr set has no archive among the listed sources)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DISTRACTOR_ARCHIVES = 10  #: 10 x 10k images = the "100k" distractor set
MAX_DISTRACTOR_ARCHIVES = 100  #: revisitop1m.1 .. revisitop1m.100

_OXFORD = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
_PARIS = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
_GND_CLASSIC = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test"
_GND_REVISITED = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
REVISITOP1M_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg"


@dataclass(frozen=True)
class Known:
    """Verified facts about a source file; None = unknown (that check is skipped)."""

    size: int | None = None
    sha256: str | None = None


#: Known sizes / sha256 by official URL. Empty on purpose: no value here has been verified
#: against the official files (they cannot be reached from where this was written), and a
#: wrong value would reject a good download. Each download prints its size and sha256; add
#: them here once checked against a second copy.
KNOWN: dict[str, Known] = {}


@dataclass(frozen=True)
class ArchiveSource:
    """One archive of a catalogue entry and how its members are laid out."""

    url: str
    flatten: bool = False  # every file to the target's top level (names must be unique)
    strip_prefix: str | None = None  # leading folder removed where present (``paris/``)


@dataclass(frozen=True)
class Entry:
    """A downloadable benchmark: its archives, ground truth and the layouts it provides."""

    description: str
    default_layout: str
    layouts: tuple[str, ...]  # layouts whose files this entry provides
    default_images: str  # relative to the root (the config file's folder)
    default_groundtruth: str | None
    images: tuple[ArchiveSource, ...] = ()
    gt_archive: ArchiveSource | None = None  # Oxford-style text files (folder layouts)
    gnd_pickle: str | None = None  # gnd_*.pkl URL
    distractors: bool = False


_OXFORD_IMAGES = (ArchiveSource(f"{_OXFORD}/oxbuild_images-v1.tgz", flatten=True),)
_PARIS_IMAGES = (
    ArchiveSource(f"{_PARIS}/paris_1-v1.tgz", strip_prefix="paris"),
    ArchiveSource(f"{_PARIS}/paris_2-v1.tgz", strip_prefix="paris"),
)

#: What each downloadable name fetches; the default paths are those of the commented-out
#: entries in ``data/datasets.yaml``.
CATALOGUE: dict[str, Entry] = {
    "oxford5k": Entry(
        "Oxford Buildings: 5,063 images, 55 queries",
        "oxford",
        ("oxford", "paris", "gnd"),
        "oxford5k/jpg",
        "groundtruth/oxford5k",
        images=_OXFORD_IMAGES,
        gt_archive=ArchiveSource(f"{_OXFORD}/gt_files_170407.tgz", flatten=True),
        gnd_pickle=f"{_GND_CLASSIC}/oxford5k/gnd_oxford5k.pkl",
    ),
    "paris6k": Entry(
        "Paris: 6,412 images in landmark folders, 55 queries",
        "paris",
        ("paris", "oxford", "gnd"),
        "paris6k/jpg",
        "groundtruth/paris6k",
        images=_PARIS_IMAGES,
        gt_archive=ArchiveSource(f"{_PARIS}/paris_120310.tgz", flatten=True),
        gnd_pickle=f"{_GND_CLASSIC}/paris6k/gnd_paris6k.pkl",
    ),
    "roxford5k": Entry(
        "Revisited Oxford: the Oxford images, 70 queries (Easy/Medium/Hard)",
        "revisited",
        ("revisited", "gnd"),
        "oxford5k/jpg",
        "groundtruth/revisited/gnd_roxford5k.pkl",
        images=_OXFORD_IMAGES,
        gnd_pickle=f"{_GND_REVISITED}/roxford5k/gnd_roxford5k.pkl",
    ),
    "rparis6k": Entry(
        "Revisited Paris: the Paris images, 70 queries (Easy/Medium/Hard)",
        "revisited",
        ("revisited", "gnd"),
        "paris6k/jpg",
        "groundtruth/revisited/gnd_rparis6k.pkl",
        images=_PARIS_IMAGES,
        gnd_pickle=f"{_GND_REVISITED}/rparis6k/gnd_rparis6k.pkl",
    ),
    "flickr100k": Entry(
        "distractors: the first N x 10k images of Revisited 1M (default N = 10)",
        "folder",
        ("folder",),
        "flickr100k/jpg",
        None,
        distractors=True,
    ),
}

#: ``cw-pipeline download test-data`` (:mod:`cw_pipeline.download.test_data`): UKBench's
#: archive (the Internet Archive's copy first: its authors' host no longer answers reliably),
#: then the ground truth by target folder: text archives (extracted flat) and pickles.
UKBENCH_URLS = (
    "https://archive.org/download/ukbench/ukbench.zip",
    "http://www.vis.uky.edu/~stewe/ukbench/ukbench.zip",
)
TEST_DATA_GROUNDTRUTH: dict[str, tuple[str, ...]] = {
    "groundtruth/oxford5k": (
        f"{_OXFORD}/gt_files_170407.tgz",
        f"{_GND_CLASSIC}/oxford5k/gnd_oxford5k.pkl",
    ),
    "groundtruth/paris6k": (
        f"{_PARIS}/paris_120310.tgz",
        f"{_GND_CLASSIC}/paris6k/gnd_paris6k.pkl",
    ),
    "groundtruth/revisited": (
        f"{_GND_REVISITED}/roxford5k/gnd_roxford5k.pkl",
        f"{_GND_REVISITED}/rparis6k/gnd_rparis6k.pkl",
    ),
}

#: Other accepted names.
ALIASES: dict[str, str] = {"distractors": "flickr100k", "revisitop1m": "flickr100k"}
