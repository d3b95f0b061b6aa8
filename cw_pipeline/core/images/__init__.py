"""Image loading and geometric preprocessing (pure: Pillow + numpy, torch for tensors).

* :mod:`.loading`: :func:`load_image` decodes a file fully, applies EXIF orientation and
  returns an RGB image; :func:`load_resized` loads a file already resized by a policy, never
  holding more than the decoded file at once (JPEGs are reduced while decoding), refusing
  outputs over a pixel budget; :func:`image_size` reads (width, height) after EXIF orientation
  from the header only; :func:`open_regular_file` opens nothing but regular files.
* :mod:`.resizing`: :class:`ResizePolicy` / :func:`resize` implement the resizing schemes of
  the paper; :func:`center_crop`, :func:`crop_box`, :func:`scale_box` handle crops and query
  boxes; :func:`to_tensor` stacks equally sized RGB images into a normalised ``N×3×H×W``
  tensor.

This package re-exports their public API.
"""

from cw_pipeline.core.images.loading import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    image_size,
    load_image,
    load_resized,
    open_regular_file,
    to_rgb,
)
from cw_pipeline.core.images.resizing import (
    ResizeMode,
    ResizePolicy,
    center_crop,
    crop_box,
    resize,
    scale_box,
    to_tensor,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "ResizeMode",
    "ResizePolicy",
    "center_crop",
    "crop_box",
    "image_size",
    "load_image",
    "load_resized",
    "open_regular_file",
    "resize",
    "scale_box",
    "to_rgb",
    "to_tensor",
]
