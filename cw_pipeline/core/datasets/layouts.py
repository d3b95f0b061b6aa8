"""Dataset layouts: the one list of their names (:data:`Layout`) and the named subsets that
say what each layout has — where its ground truth comes from, whether its images are grouped
into objects, how its image ids are formed, which ones ``cw-pipeline evaluate`` reads.

A new layout is a name here (and in the subsets it belongs to) and its reader beside the
others in this package."""

from __future__ import annotations

from typing import Literal, get_args

Layout = Literal["oxford", "paris", "gnd", "revisited", "ukbench", "holidays", "folder"]

#: Every layout, in the order messages list them (the YAML's ``layout:`` accepts each).
LAYOUTS: tuple[Layout, ...] = get_args(Layout)

#: Ground truth in a folder of Oxford-style text files (``groundtruth``: the folder).
GT_FOLDER_LAYOUTS: frozenset[Layout] = frozenset({"oxford", "paris"})
#: Ground truth in a ``gnd_*.pkl`` file (``groundtruth``: the file).
GT_FILE_LAYOUTS: frozenset[Layout] = frozenset({"gnd", "revisited"})
#: Images grouped into objects, the ground truth following from the file names (no
#: ``groundtruth`` entry): every image is a query of its object, and the set may learn its
#: PCA on one half of its objects for the other (self-split, ``--pca-split``).
GROUPED_LAYOUTS: frozenset[Layout] = frozenset({"ukbench", "holidays"})
#: Image ids are bare file names, sub-folders left out: the ground-truth files name images so.
FLAT_ID_LAYOUTS: frozenset[Layout] = GT_FOLDER_LAYOUTS | GT_FILE_LAYOUTS
#: The layouts ``cw-pipeline evaluate --layout`` reads: not ``folder`` (no ground truth), nor
#: ``revisited`` (its ``gnd_*.pkl`` is read with ``--layout gnd``, which tells the revisited
#: protocol from the file's fields).
EVALUATE_LAYOUTS: tuple[Layout, ...] = ("oxford", "paris", "gnd", "ukbench", "holidays")
