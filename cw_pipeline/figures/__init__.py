"""Pictures of retrieval results (no Dagster): results sheets, CAM overlays, PR curves, AP bars.

* :func:`results_sheet` — the query (its box drawn) then the top results, each framed by its
  ground-truth label and captioned with rank, id and score (:mod:`~cw_pipeline.figures.sheets`).
* :func:`cam_overlay` — a CAM heatmap over its image with the re-ranking boxes drawn.
* :func:`pr_curves` / :func:`ap_bars` — matplotlib charts (``Agg`` canvas on a
  :class:`matplotlib.figure.Figure`; pyplot's global state is never touched); these and the
  overlay are in :mod:`~cw_pipeline.figures.charts`.
* :func:`save_png` — atomic PNG write (temp file + rename).
* :func:`cw_pipeline.figures.cams.query_cam_figure` — a query's CAM on an image, computed
  by the network (the report's CAM samples).

Images are read with :func:`cw_pipeline.core.images.load_image`, so EXIF orientation is applied
exactly as for feature extraction, and query boxes (in the upright image's pixels) line up.
"""

from cw_pipeline.figures.charts import (
    BOX_COLOURS,
    RECALL_GRID,
    ap_bars,
    ap_bars_figure,
    cam_overlay,
    figure_image,
    mean_pr_curve,
    pr_curves,
    pr_curves_figure,
)
from cw_pipeline.figures.sheets import (
    FRAME_COLOURS,
    LABELS,
    QUERY_BOX_COLOUR,
    SheetItem,
    png_bytes,
    results_sheet,
    save_png,
    sheet_tile_box,
    thumbnail,
    with_caption,
)

__all__ = [
    "BOX_COLOURS",
    "FRAME_COLOURS",
    "LABELS",
    "QUERY_BOX_COLOUR",
    "RECALL_GRID",
    "SheetItem",
    "ap_bars",
    "ap_bars_figure",
    "cam_overlay",
    "figure_image",
    "mean_pr_curve",
    "png_bytes",
    "pr_curves",
    "pr_curves_figure",
    "results_sheet",
    "save_png",
    "sheet_tile_box",
    "thumbnail",
    "with_caption",
]
