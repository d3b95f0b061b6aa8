"""From images to per-image records: top classes, class vectors, sum-pooled vector, CAM boxes.

One forward pass per image gives everything the index needs (the paper's Fig. 1, stages 1-2).
``FeatureExtractor.extract_files`` decodes and resizes images on background threads while the
network runs, groups images of equal size into batches, and yields one record per file.

Memory is bounded by ``batch_pixels``, not by the input: a forward pass holds at most that many
input pixels (about 300 bytes each for efficientnet_lite0 on the CPU), the images decoded ahead
and waiting in half-full batches about as many again, and an image whose network input alone is
over the budget is refused from its header, before decoding.

The package holds :mod:`.config` (settings), :mod:`.records` (what is produced) and
:mod:`.extractor` (the batched forward pass); it re-exports their public API.
"""

from cw_pipeline.core.extract.config import (
    CPU_BATCH_TARGET_PIXELS,
    DEFAULT_BATCH_PIXELS,
    DEFAULT_RESIZE,
    ExtractionConfig,
    RuntimeConfig,
    valid_device,
)
from cw_pipeline.core.extract.extractor import FeatureExtractor
from cw_pipeline.core.extract.records import (
    ExtractionStats,
    FeatureMaps,
    ImageFeatures,
    crop_cells,
    encode_maps,
)

__all__ = [
    "CPU_BATCH_TARGET_PIXELS",
    "DEFAULT_BATCH_PIXELS",
    "DEFAULT_RESIZE",
    "ExtractionConfig",
    "ExtractionStats",
    "FeatureExtractor",
    "FeatureMaps",
    "ImageFeatures",
    "RuntimeConfig",
    "crop_cells",
    "encode_maps",
    "valid_device",
]
