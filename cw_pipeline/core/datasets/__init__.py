"""Retrieval datasets: ground-truth readers (Oxford/Paris text files, ``gnd_*.pkl``, UKBench,
INRIA Holidays) and a deterministic image-folder scanner.

Image ids are file names without extension (``"all_souls_000013"``); the scanner keeps
sub-folders in the id (``"shard1/img"``) unless asked for flat ids. One module per layout
(:mod:`.oxford`, :mod:`.gnd`, :mod:`.ukbench`, :mod:`.holidays`, :mod:`.folder`) over the
shared :mod:`.model`; this package re-exports their public API.
"""

from cw_pipeline.core.datasets.folder import (
    FolderScan,
    ScannedFile,
    SkippedFile,
    file_kind,
    name_problem,
    scan_folder,
    scan_image_folder,
    shown_name,
    skipped_summary,
)
from cw_pipeline.core.datasets.gnd import load_gnd_pickle
from cw_pipeline.core.datasets.holidays import holidays_groundtruth, holidays_labels
from cw_pipeline.core.datasets.model import (
    DEFAULT_IMAGE_EXTENSIONS,
    GroundTruth,
    Query,
    QueryProtocol,
    check_image_id,
    check_query_protocol,
    image_path,
    validate_groundtruth,
)
from cw_pipeline.core.datasets.oxford import read_oxford_groundtruth
from cw_pipeline.core.datasets.safe_pickle import (
    MAX_GND_PICKLE_BYTES,
    MAX_GND_PICKLE_DEPTH,
    PickleLimitError,
    UnsafePickleError,
)
from cw_pipeline.core.datasets.text import TextDecodeError, decode_text, read_text_lines
from cw_pipeline.core.datasets.ukbench import ukbench_groundtruth, ukbench_labels

__all__ = [
    "DEFAULT_IMAGE_EXTENSIONS",
    "MAX_GND_PICKLE_BYTES",
    "MAX_GND_PICKLE_DEPTH",
    "FolderScan",
    "GroundTruth",
    "PickleLimitError",
    "Query",
    "QueryProtocol",
    "ScannedFile",
    "SkippedFile",
    "TextDecodeError",
    "UnsafePickleError",
    "check_image_id",
    "check_query_protocol",
    "decode_text",
    "file_kind",
    "holidays_groundtruth",
    "holidays_labels",
    "image_path",
    "load_gnd_pickle",
    "name_problem",
    "read_oxford_groundtruth",
    "read_text_lines",
    "scan_folder",
    "scan_image_folder",
    "shown_name",
    "skipped_summary",
    "ukbench_groundtruth",
    "ukbench_labels",
    "validate_groundtruth",
]
