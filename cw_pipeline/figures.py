"""Pictures of retrieval results (no Dagster): results sheets, CAM overlays, PR curves, AP bars.

* :func:`results_sheet` — the query (its box drawn) then the top results, each framed by its
  ground-truth label (green positive, red negative, grey junk, neutral when unknown) and
  captioned with rank, id and score. Unreadable result images become a placeholder tile.
* :func:`cam_overlay` — a CAM heatmap over its image with the re-ranking boxes drawn.
* :func:`pr_curves` / :func:`ap_bars` — matplotlib charts (``Agg`` canvas on a
  :class:`matplotlib.figure.Figure`; pyplot's global state is never touched).
* :func:`save_png` — atomic PNG write (temp file + rename).

Images are read with :func:`cw_pipeline.core.images.load_image`, so EXIF orientation is applied
exactly as for feature extraction, and query boxes (in the upright image's pixels) line up.
"""

from __future__ import annotations

import functools
import io
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cw_pipeline.core.images import ImageLoadError, load_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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

LABELS = ("positive", "negative", "junk", "none")
#: Frame colour per ground-truth label; the query's own frame is ``FRAME_COLOURS["query"]``.
FRAME_COLOURS: dict[str, tuple[int, int, int]] = {
    "positive": (0, 170, 0),
    "negative": (220, 0, 0),
    "junk": (128, 128, 128),
    "none": (210, 210, 210),
    "query": (30, 90, 200),
}
QUERY_BOX_COLOUR = (255, 210, 0)
_BACKGROUND = (255, 255, 255)
_TILE_FILL = (245, 245, 245)
_UNREADABLE_FILL = (225, 225, 225)
_TEXT = (20, 20, 20)
_MARGIN = 8  # around the sheet and between tiles


@dataclass(frozen=True)
class SheetItem:
    """One result on a results sheet.

    Attributes:
        path: the image file.
        score: its similarity score.
        label: ``"positive"`` (green frame), ``"negative"`` (red), ``"junk"`` (grey) or
            ``"none"`` (no ground truth: neutral frame).
        caption: e.g. the image id (default: the file name without suffix).
    """

    path: Path
    score: float
    label: str = "none"
    caption: str = ""

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"unknown label {self.label!r} for {self.path}; expected {LABELS}")


# ------------------------------------------------------------------------------ helpers


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans when installed (wide Unicode coverage), else Pillow's bundled font."""
    size = max(8, int(size))
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """``text`` shortened with an ellipsis in the middle so it fits ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    keep = len(text)
    while keep > 1:
        keep -= 1
        head = (keep + 1) // 2
        tail = keep - head
        candidate = text[:head] + "…" + (text[-tail:] if tail else "")
        if _text_width(draw, candidate, font) <= width:
            return candidate
    return "…"


def _border(thumb: int) -> int:
    return max(3, thumb // 27)


def _caption_height(thumb: int) -> int:
    return 2 * (_font_size(thumb) + 4) + 2


def _font_size(thumb: int) -> int:
    return max(10, thumb // 12)


def _title_height(title: str, thumb: int) -> int:
    return _font_size(thumb) + 10 if title else 0


def sheet_tile_box(
    index: int, thumb: int = 160, columns: int = 11, title: str = ""
) -> tuple[int, int, int, int]:
    """Pixel box ``(x1, y1, x2, y2)`` (end-exclusive) of tile ``index`` on a results sheet,
    frame included; tile 0 is the query. The image area is this box shrunk by the frame width
    (``max(3, thumb // 27)``)."""
    b = _border(thumb)
    cell_w = thumb + 2 * b
    cell_h = cell_w + _caption_height(thumb)
    row, col = divmod(index, columns)
    x1 = _MARGIN + col * (cell_w + _MARGIN)
    y1 = _MARGIN + _title_height(title, thumb) + row * (cell_h + _MARGIN)
    return x1, y1, x1 + cell_w, y1 + cell_w


def thumbnail(image: Image.Image, size: int) -> tuple[Image.Image, float]:
    """``image`` scaled (aspect kept, never enlarged) to fit ``size``×``size``, and the scale."""
    scale = min(size / image.width, size / image.height, 1.0)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    if (w, h) == image.size:
        return image, 1.0
    return image.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=2.0), scale


def _placeholder(thumb: int, text: str) -> Image.Image:
    tile = Image.new("RGB", (thumb, thumb), _UNREADABLE_FILL)
    draw = ImageDraw.Draw(tile)
    draw.line((0, 0, thumb - 1, thumb - 1), fill=(190, 190, 190), width=2)
    draw.line((0, thumb - 1, thumb - 1, 0), fill=(190, 190, 190), width=2)
    font = _font(_font_size(thumb))
    label = _fit_text(draw, text, font, thumb - 8)
    bbox = draw.textbbox((0, 0), label, font=font)
    tw, th = bbox[2] - bbox[0], bbox[3] - bbox[1]
    x, y = (thumb - tw) / 2 - bbox[0], (thumb - th) / 2 - bbox[1]
    draw.rectangle((x - 3, y - 3 + bbox[1], x + tw + 3, y + th + 3 + bbox[1]), fill=_TILE_FILL)
    draw.text((x, y), label, fill=_TEXT, font=font)
    return tile


def _paste_tile(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    content: Image.Image,
    frame: tuple[int, int, int],
    border: int,
) -> tuple[int, int]:
    """Frame ``box`` in ``frame`` colour and centre ``content`` inside; returns its origin."""
    x1, y1, x2, y2 = box
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=frame)
    draw.rectangle((x1 + border, y1 + border, x2 - 1 - border, y2 - 1 - border), fill=_TILE_FILL)
    inner = x2 - x1 - 2 * border
    ox = x1 + border + (inner - content.width) // 2
    oy = y1 + border + (inner - content.height) // 2
    sheet.paste(content, (ox, oy))
    return ox, oy


def _caption(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], lines: Sequence[str], thumb: int
) -> None:
    font = _font(_font_size(thumb))
    x1, _, x2, y2 = box
    y = y2 + 3
    for line in lines:
        draw.text((x1, y), _fit_text(draw, line, font, x2 - x1), fill=_TEXT, font=font)
        y += _font_size(thumb) + 4


# ------------------------------------------------------------------------------ results sheet


def results_sheet(
    query: Path,
    box: tuple[float, float, float, float] | None,
    items: Sequence[SheetItem],
    title: str = "",
    thumb: int = 160,
    columns: int | None = None,
) -> Image.Image:
    """The query (``box`` drawn, in the upright image's pixels) then ``items`` in rank order.

    Each result is framed by its label colour (:data:`FRAME_COLOURS`) and captioned
    ``#rank caption`` / score. Tiles run in one row of up to 11 (query + top 10), then wrap;
    ``columns`` overrides that. A result that cannot be read becomes an "unreadable" tile.

    Raises:
        FileNotFoundError, ImageLoadError: the *query* image cannot be read.
        ValueError: ``thumb`` < 32 or ``columns`` < 1.
    """
    if thumb < 32:
        raise ValueError(f"thumb must be >= 32 pixels, got {thumb}")
    n_tiles = len(items) + 1
    cols = min(n_tiles, 11) if columns is None else int(columns)
    if cols < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = math.ceil(n_tiles / cols)
    border = _border(thumb)
    cell_w = thumb + 2 * border
    cell_h = cell_w + _caption_height(thumb)
    width = _MARGIN + min(cols, n_tiles) * (cell_w + _MARGIN)
    height = _MARGIN + _title_height(title, thumb) + rows * (cell_h + _MARGIN)
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        font = _font(_font_size(thumb))
        draw.text(
            (_MARGIN, _MARGIN), _fit_text(draw, title, font, width - 2 * _MARGIN), _TEXT, font
        )

    # The query: a missing or broken query is the caller's error, not a tile.
    query = Path(query)
    q_image = load_image(query)
    q_thumb, _ = thumbnail(q_image, thumb)
    q_box = sheet_tile_box(0, thumb, cols, title)
    ox, oy = _paste_tile(sheet, draw, q_box, q_thumb, FRAME_COLOURS["query"], border)
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 < x1 or y2 < y1:
            raise ValueError(f"query box {box} for {query} is not (x1, y1, x2, y2)")
        sx, sy = q_thumb.width / q_image.width, q_thumb.height / q_image.height
        line = max(2, thumb // 64)
        rect = (
            ox + max(0.0, x1) * sx,
            oy + max(0.0, y1) * sy,
            ox + min(float(q_image.width), x2) * sx - 1,
            oy + min(float(q_image.height), y2) * sy - 1,
        )
        draw.rectangle(rect, outline=QUERY_BOX_COLOUR, width=line)
    _caption(draw, q_box, ["query", query.stem], thumb)

    for rank, item in enumerate(items, start=1):
        tile_box = sheet_tile_box(rank, thumb, cols, title)
        try:
            content, _ = thumbnail(load_image(item.path), thumb)
        except (OSError, ImageLoadError, ValueError):
            content = _placeholder(thumb, "unreadable")
        _paste_tile(sheet, draw, tile_box, content, FRAME_COLOURS[item.label], border)
        name = item.caption or Path(item.path).stem
        score = f"{item.score:.4f}" + ("" if item.label == "none" else f"  {item.label}")
        _caption(draw, tile_box, [f"#{rank} {name}", score], thumb)
    return sheet


def with_caption(image: Image.Image, text: str) -> Image.Image:
    """A copy of ``image`` with ``text`` below it, wrapped at word boundaries to its width."""
    size = max(11, min(18, image.width // 40))
    font = _font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = image.width - 8
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(measure, f"{lines[-1]} {word}", font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit_text(measure, word, font, width))
    step = size + 4
    out = Image.new("RGB", (image.width, image.height + step * len(lines) + 6), _BACKGROUND)
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for k, line in enumerate(lines):
        draw.text((4, image.height + 3 + k * step), line, _TEXT, font)
    return out


# ------------------------------------------------------------------------------ saving


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Image.Image, path: Path) -> Path:
    """Write ``image`` as PNG at ``path`` atomically (temp file + rename); creates parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = png_bytes(image)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------ CAM overlay

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
    font = _font(max(10, min(out.size) // 30))
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


# ------------------------------------------------------------------------------ charts


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
