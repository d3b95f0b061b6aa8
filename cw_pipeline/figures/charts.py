"""CAM overlays and charts: a CAM heatmap over its image with the re-ranking boxes drawn, and
the matplotlib PR curves and AP bars (``Agg`` canvas on a :class:`matplotlib.figure.Figure`;
pyplot's global state is never touched).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from cw_pipeline.figures.sheets import label_font

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Outline colours of CAM boxes, one per threshold (cycled).
BOX_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),
    (0, 255, 255),
    (255, 0, 255),
    (255, 255, 0),
    (0, 255, 0),
    (255, 128, 0),
)


def _colormap(name: str) -> np.ndarray:
    """256 × 3 uint8 lookup table of a matplotlib colormap (no pyplot)."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def cam_overlay(
    image: Image.Image,
    cam_map: np.ndarray,
    boxes: np.ndarray | Sequence[Sequence[float]] = (),
    labels: Sequence[str] = (),
    alpha: float = 0.5,
    colormap: str = "jet",
) -> Image.Image:
    """``cam_map`` as a heatmap over ``image`` (same size as ``image``), ``boxes`` outlined.

    Args:
        image: the upright RGB image.
        cam_map: an h × w heatmap on any grid (e.g. the feature map's), resized bilinearly to
            the image; it is divided by its maximum (values ≤ 0 show as the colormap's low end).
        boxes: T × 4 boxes (x1, y1, x2, y2) in ``image`` pixels, end-exclusive — e.g.
            :func:`cw_pipeline.core.cams.boxes_to_pixels` of ``heatmap_boxes``; NaN rows
            (thresholds without a region) are skipped.
        labels: optional text per box (e.g. the threshold), drawn at its top-left corner.
        alpha: heatmap opacity in [0, 1].

    Raises:
        ValueError: a cam_map that is not a non-empty finite 2-D array, boxes not T × 4, more
            labels than boxes, or alpha outside [0, 1].
    """
    heat = np.asarray(cam_map, dtype=np.float32)
    if heat.ndim != 2 or heat.size == 0 or not np.isfinite(heat).all():
        raise ValueError(f"cam_map must be a finite, non-empty h×w array, got shape {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    box_arr = np.asarray(boxes, dtype=np.float64)
    if box_arr.size == 0:
        box_arr = np.zeros((0, 4))
    if box_arr.ndim != 2 or box_arr.shape[1] != 4:
        raise ValueError(f"boxes must be T×4 (x1, y1, x2, y2), got shape {box_arr.shape}")
    if len(labels) > len(box_arr):
        raise ValueError(f"{len(labels)} labels for {len(box_arr)} boxes")
    base = image.convert("RGB")
    peak = float(heat.max())
    norm = np.clip(heat / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(heat)
    resized = Image.fromarray(norm, mode="F").resize(base.size, Image.Resampling.BILINEAR)
    idx = np.clip(np.asarray(resized) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    coloured = Image.fromarray(_colormap(colormap)[idx], mode="RGB")
    out = Image.blend(base, coloured, alpha)
    draw = ImageDraw.Draw(out)
    line = max(2, min(out.size) // 150)
    font = label_font(max(10, min(out.size) // 30))
    placed: list[tuple[float, float, float, float]] = []
    for i, b in enumerate(box_arr):
        if not np.isfinite(b).all():
            continue
        x1, y1 = max(0.0, b[0]), max(0.0, b[1])
        x2, y2 = min(float(out.width), b[2]) - 1, min(float(out.height), b[3]) - 1
        if x2 < x1 or y2 < y1:
            continue
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        if i < len(labels) and labels[i]:
            # Boxes often coincide: move a label down until it covers no earlier label.
            at = [x1 + line + 1, y1 + line + 1]
            tb = draw.textbbox(tuple(at), labels[i], font=font)
            while any(_overlaps(tb, other) for other in placed) and tb[3] < out.height:
                at[1] += tb[3] - tb[1] + 2
                tb = draw.textbbox(tuple(at), labels[i], font=font)
            placed.append(tb)
            draw.rectangle(tb, fill=(0, 0, 0))
            draw.text(tuple(at), labels[i], fill=colour, font=font)
    return out


def _overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def figure_image(fig: Figure) -> Image.Image:
    """Render a matplotlib :class:`~matplotlib.figure.Figure` with the Agg canvas to RGB."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy(), mode="RGB")


def _new_figure(size: tuple[int, int], dpi: int) -> Figure:
    from matplotlib.figure import Figure

    if size[0] < 100 or size[1] < 100:
        raise ValueError(f"figure size must be at least 100×100 pixels, got {size}")
    return Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")


#: Recall levels of :func:`mean_pr_curve`.
RECALL_GRID = np.linspace(0.0, 1.0, 101)


def mean_pr_curve(
    curves: Sequence[tuple[np.ndarray, np.ndarray]], recall: np.ndarray = RECALL_GRID
) -> np.ndarray:
    """Mean over queries of the interpolated precision at each ``recall`` level.

    ``curves`` holds one ``(precision, recall)`` pair per query, as returned by
    :func:`cw_pipeline.core.evaluation.precision_recall_points` (junk already removed, the
    Oxford protocol). Interpolated precision at ``r`` is the best precision at any recall
    ≥ ``r``, and 0 beyond the last recall a (truncated) ranking reaches.

    Raises:
        ValueError: no curves, or a pair of unequal lengths.
    """
    if not curves:
        raise ValueError("mean_pr_curve needs at least one query's curve")
    out = np.zeros(len(recall), dtype=np.float64)
    for k, (prec, rec) in enumerate(curves):
        p, r = np.asarray(prec, np.float64), np.asarray(rec, np.float64)
        if p.shape != r.shape or p.ndim != 1:
            raise ValueError(f"curve {k}: precision {p.shape} and recall {r.shape} differ")
        if p.size == 0:
            continue
        envelope = np.maximum.accumulate(p[::-1])[::-1]  # best precision at recall >= r[i]
        pos = np.searchsorted(r, recall, side="left")
        valid = pos < r.size
        out[valid] += envelope[pos[valid]]
    return out / len(curves)


def pr_curves_figure(
    curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
    title: str = "",
    maps: Mapping[str, float] | None = None,
    queries: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]] | None = None,
    size: tuple[int, int] = (720, 540),
    dpi: int = 100,
) -> Figure:
    """Precision–recall figure: per method, the mean interpolated curve over its queries
    (:func:`mean_pr_curve`, solid); ``queries`` (method → label → one query's curve) adds
    selected queries' interpolated curves, thin and dashed in the method's colour. ``maps``
    (method → mAP) labels the legend."""
    if not curves:
        raise ValueError("pr_curves needs at least one method")
    fig = _new_figure(size, dpi)
    ax = fig.add_subplot()
    styles = ("--", ":", "-.")
    for k, (method, per_query) in enumerate(curves.items()):
        colour = f"C{k % 10}"
        label = method if not maps or method not in maps else f"{method} (mAP {maps[method]:.3f})"
        ax.plot(RECALL_GRID, mean_pr_curve(per_query), color=colour, lw=2, label=label)
        for j, (qid, curve) in enumerate((queries or {}).get(method, {}).items()):
            ax.plot(
                RECALL_GRID,
                mean_pr_curve([curve]),
                color=colour,
                lw=0.8,
                ls=styles[j % len(styles)],
                label=f"{method}: {qid}",
            )
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "precision–recall (mean over queries, junk ignored)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def pr_curves(
    curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
    title: str = "",
    maps: Mapping[str, float] | None = None,
    queries: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]] | None = None,
    size: tuple[int, int] = (720, 540),
    dpi: int = 100,
) -> Image.Image:
    """:func:`pr_curves_figure` rendered to an RGB image of exactly ``size`` pixels."""
    return figure_image(pr_curves_figure(curves, title, maps, queries, size, dpi))


def ap_bars_figure(
    aps: Mapping[str, Mapping[str, float]],
    title: str = "",
    height: int = 480,
    dpi: int = 100,
) -> Figure:
    """Grouped bar chart of per-query AP: one group per query, one bar per method.

    ``aps`` maps method → query id → AP (NaN: a query without positives, drawn as no bar).
    Queries are in the first method's order, then any others; the width grows with the
    number of bars (at least 640, at most 6000 pixels).
    """
    if not aps:
        raise ValueError("ap_bars needs at least one method")
    methods = list(aps)
    queries: list[str] = []
    seen: set[str] = set()
    for per_query in aps.values():
        for q in per_query:
            if q not in seen:
                seen.add(q)
                queries.append(q)
    if not queries:
        raise ValueError("ap_bars needs at least one query")
    n, m = len(queries), len(methods)
    width = int(min(6000, max(640, 120 + n * (m * 7 + 10))))
    fig = _new_figure((width, height), dpi)
    ax = fig.add_subplot()
    bar = 0.8 / m
    x = np.arange(n, dtype=np.float64)
    for k, method in enumerate(methods):
        values = [float(aps[method].get(q, math.nan)) for q in queries]
        ax.bar(x - 0.4 + bar * (k + 0.5), values, width=bar, color=f"C{k % 10}", label=method)
    ax.set_xticks(x, queries, rotation=90, fontsize=7 if n > 20 else 8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("AP")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title or "average precision per query", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def ap_bars(
    aps: Mapping[str, Mapping[str, float]],
    title: str = "",
    height: int = 480,
    dpi: int = 100,
) -> Image.Image:
    """:func:`ap_bars_figure` rendered to an RGB image."""
    return figure_image(ap_bars_figure(aps, title, height, dpi))
