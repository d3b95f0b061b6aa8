"""The built-in demo benchmark: real photographs, synthetic views, Oxford-format ground truth.

:func:`generate_demo` builds, in a few seconds and without any download, a small
instance-retrieval benchmark from the photographs bundled inside installed packages:
scikit-image's ``skimage/data`` files (read from disk, never through the ``skimage.data``
fetchers, some of which download) and scikit-learn's ``china.jpg`` / ``flower.jpg``.

Each *instance* is a region of one photograph (two instances may share a photograph only as
non-overlapping regions). Every instance gets one query view with a box around the object,
``views`` positive views (perspective warp, crop, scale, rotation, lighting and colour changes,
blur, noise, JPEG quality) and one heavily-cropped *junk* view. Every "ok" view and half of
the "good" ones are set, smaller, into clutter from the distractor photos, often with an
occluding patch (``render._clutter``), so that the demo separates methods. The motorcycle
instance also uses the real second photograph of its stereo pair for one view. Layout (Oxford
format, read by :func:`cw_pipeline.core.datasets.read_oxford_groundtruth`)::

    root/demo-a/jpg/<instance>_000000.jpg    query image (in the database, as in Oxford)
    root/demo-a/jpg/<instance>_00000k.jpg    views, then the junk view
    root/demo-a/gt/<instance>_1_query.txt    "oxc1_<instance>_000000 x1 y1 x2 y2"
    root/demo-a/gt/<instance>_1_good.txt     query image + easier views
    root/demo-a/gt/<instance>_1_ok.txt       the hardest views
    root/demo-a/gt/<instance>_1_junk.txt     the junk view (under 25% of the object)
    root/demo-a/manifest.json                parameters + every file's size and sha1
    root/demo-b/...                          the other half of the instances
    root/demo-distractors/jpg/distractor_NNN.jpg   photo content used by no instance

Each half is meant to be evaluated with PCA learned on the other half. Output is
byte-for-byte deterministic for given parameters and library versions: every image has its
own ``numpy`` Generator seeded from ``(seed, crc32(image name))``, so each dataset can be
generated alone. Each dataset folder is written into a temporary sibling folder and renamed
into place; a complete folder whose manifest matches the parameters is left untouched.

Modules: :mod:`.data` (the generated tables: photographs, instances, view parameters),
:mod:`.render` (images in memory) and :mod:`.generate` (folders on disk); this package
re-exports the public API.
"""

from cw_pipeline.core.demo.data import demo_instances
from cw_pipeline.core.demo.generate import (
    DEMO_DATASETS,
    DEMO_VERSION,
    DemoDataset,
    DemoInfo,
    DemoRefusedError,
    generate_demo,
)

__all__ = [
    "DEMO_DATASETS",
    "DEMO_VERSION",
    "DemoDataset",
    "DemoInfo",
    "DemoRefusedError",
    "demo_instances",
    "generate_demo",
]
