"""Pictures of results: sheets, CAM overlays, PR curves, AP bars, atomic PNG writes."""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cw_pipeline.compute import reports
from cw_pipeline.compute.report_figures import data_uri
from cw_pipeline.core.evaluation import average_precision, precision_recall_points
from cw_pipeline.core.images import ImageLoadError
from cw_pipeline.figures import (
    BOX_COLOURS,
    FRAME_COLOURS,
    QUERY_BOX_COLOUR,
    SheetItem,
    ap_bars,
    ap_bars_figure,
    cam_overlay,
    mean_pr_curve,
    pr_curves,
    results_sheet,
    save_png,
    sheet_tile_box,
    sheets,
)

GREY = (128, 128, 128)


def solid(path: Path, colour, size=(64, 48), exif_orientation: int | None = None) -> Path:
    img = Image.new("RGB", size, colour)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95, **kwargs)
    return path


def px(img: Image.Image, xy) -> tuple[int, int, int]:
    return img.getpixel((int(xy[0]), int(xy[1])))


def near(a, b, tol=12) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------ sheets


def test_sheet_frames_follow_labels_and_captions_fit(tmp_path):
    query = solid(tmp_path / "q.jpg", GREY)
    labels = ["positive", "negative", "junk", "none"]
    items = [
        SheetItem(solid(tmp_path / f"r{i}.jpg", (30 * i, 90, 200)), 0.9 - i / 10, lab, f"r{i}")
        for i, lab in enumerate(labels)
    ]
    sheet = results_sheet(query, None, items, title="q · raw", thumb=64)
    n = len(items) + 1
    assert sheet_tile_box(n - 1, 64, n, "q · raw")[2] < sheet.width
    for k, lab in enumerate(["query", *labels]):
        x1, y1, x2, y2 = sheet_tile_box(k, 64, n, "q · raw")
        colour = FRAME_COLOURS[lab]
        # Every side of the frame is the label's colour.
        for point in [(x1 + 1, y1 + 1), (x2 - 2, (y1 + y2) // 2), ((x1 + x2) // 2, y2 - 2)]:
            assert px(sheet, point) == colour, (lab, point)
        # The image itself sits inside (centre pixel is the image's colour, not the frame).
        centre = px(sheet, ((x1 + x2) // 2, (y1 + y2) // 2))
        assert centre != colour
    centre = sheet_tile_box(2, 64, n, "q · raw")
    assert near(
        px(sheet, ((centre[0] + centre[2]) // 2, (centre[1] + centre[3]) // 2)), (30, 90, 200)
    )


def test_sheet_wraps_into_rows(tmp_path):
    query = solid(tmp_path / "q.jpg", GREY)
    items = [SheetItem(query, 1.0, "positive")] * 5
    one_row = results_sheet(query, None, items, thumb=40)
    grid = results_sheet(query, None, items, thumb=40, columns=3)
    assert grid.width < one_row.width and grid.height > one_row.height
    x1, y1, _, _ = sheet_tile_box(4, 40, 3)  # second row, second column
    assert px(grid, (x1 + 1, y1 + 1)) == FRAME_COLOURS["positive"]


def test_query_box_drawn_where_it_is(tmp_path):
    query = solid(tmp_path / "q.png", (40, 40, 40), size=(100, 80))
    box = (20, 10, 60, 50)
    sheet = results_sheet(query, box, [], thumb=100)
    x1, y1, _, _ = sheet_tile_box(0, 100, 1)
    border = max(3, 100 // 27)
    ox, oy = x1 + border, y1 + border + (100 - 80) // 2  # 100×80 centred, not enlarged
    assert px(sheet, (ox + 20, oy + 30)) == QUERY_BOX_COLOUR  # left edge
    assert px(sheet, (ox + 58, oy + 30)) == QUERY_BOX_COLOUR  # right edge (x2 exclusive)
    assert px(sheet, (ox + 40, oy + 10)) == QUERY_BOX_COLOUR  # top edge
    assert px(sheet, (ox + 40, oy + 30)) == (40, 40, 40)  # inside the box: the image
    assert px(sheet, (ox + 10, oy + 30)) == (40, 40, 40)  # left of it: the image


def test_query_box_uses_exif_upright_coordinates(tmp_path):
    # Stored 80×40 with orientation 6 (rotate 90° clockwise): upright it is 40×80. Left half
    # red, right half blue when stored → top red, bottom blue when upright.
    raw = np.zeros((40, 80, 3), np.uint8)
    raw[:, :40] = (255, 0, 0)
    raw[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(raw).save(path, quality=95, exif=exif)
    sheet = results_sheet(path, (0, 40, 40, 80), [SheetItem(path, 1.0)], thumb=80)
    x1, y1, _, _ = sheet_tile_box(0, 80, 2)
    border = max(3, 80 // 27)
    ox, oy = x1 + border + (80 - 40) // 2, y1 + border
    assert near(px(sheet, (ox + 20, oy + 20)), (255, 0, 0), 40)  # top: red
    assert near(px(sheet, (ox + 20, oy + 60)), (0, 0, 255), 40)  # bottom: blue
    assert px(sheet, (ox + 20, oy + 40)) == QUERY_BOX_COLOUR  # box top edge at upright y=40
    # The result tile shows the same upright (portrait) image.
    rx1, ry1, _, _ = sheet_tile_box(1, 80, 2)
    assert near(px(sheet, (rx1 + border + 40, ry1 + border + 20)), (255, 0, 0), 40)


def test_unreadable_results_become_placeholders(tmp_path):
    query = solid(tmp_path / "q.jpg", GREY)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    items = [
        SheetItem(broken, 0.5, "negative", "broken"),
        SheetItem(tmp_path / "missing.jpg", 0.4, "junk", "missing"),
    ]
    sheet = results_sheet(query, None, items, thumb=64)
    for k, lab in ((1, "negative"), (2, "junk")):
        x1, y1, x2, y2 = sheet_tile_box(k, 64, 3)
        assert px(sheet, (x1 + 1, y1 + 1)) == FRAME_COLOURS[lab]
        # Between the placeholder's diagonals, above its text: the placeholder fill.
        assert px(sheet, ((x1 + x2) // 2, y1 + (y2 - y1) // 4)) == sheets._UNREADABLE_FILL


def test_unreadable_query_and_bad_arguments_fail(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"nope")
    with pytest.raises(ImageLoadError, match=r"broken\.jpg"):
        results_sheet(broken, None, [])
    with pytest.raises(FileNotFoundError):
        results_sheet(tmp_path / "absent.jpg", None, [])
    with pytest.raises(ValueError, match="label"):
        SheetItem(broken, 1.0, "maybe")
    query = solid(tmp_path / "q.jpg", GREY)
    with pytest.raises(ValueError, match="query box"):
        results_sheet(query, (10, 10, 5, 20), [])


# ------------------------------------------------------------------------------ saving


def test_save_png_is_atomic_and_creates_parents(tmp_path, monkeypatch):
    img = Image.new("RGB", (30, 20), (1, 2, 3))
    target = tmp_path / "a" / "b" / "x.png"
    assert save_png(img, target) == target
    with Image.open(target) as back:
        assert back.format == "PNG" and back.size == (30, 20)
        assert back.convert("RGB").getpixel((5, 5)) == (1, 2, 3)
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.png"]

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_png(Image.new("RGB", (5, 5), (9, 9, 9)), target)
    # The old file is intact and no temporary file is left behind.
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.png"]
    with Image.open(target) as back:
        assert back.size == (30, 20)


# ------------------------------------------------------------------------------ CAM overlay


def test_cam_overlay_heat_and_boxes():
    image = Image.new("RGB", (90, 60), (128, 128, 128))
    cam = np.zeros((4, 6), np.float32)
    cam[0, 5] = 2.0  # hottest at the top-right cell
    out = cam_overlay(image, cam, alpha=1.0)
    assert out.size == image.size
    hot, cold = px(out, (87, 2)), px(out, (2, 57))
    assert hot[0] > 100 and hot[2] < 60  # jet's top end is red
    assert cold[2] > 100 and cold[0] < 60  # jet's bottom end is blue

    boxes = np.array([[10, 10, 50, 40], [np.nan] * 4, [60, 5, 80, 30]], np.float32)
    out = cam_overlay(image, cam, boxes, labels=["1%", "", "20%"], alpha=0.3)
    assert out.size == (90, 60)
    assert px(out, (10, 25)) == BOX_COLOURS[0]  # left edge of the first box
    assert px(out, (49, 25)) == BOX_COLOURS[0]  # right edge (end-exclusive)
    assert px(out, (70, 29)) == BOX_COLOURS[2]  # bottom edge of the third box
    assert px(out, (30, 25)) not in BOX_COLOURS  # the inside is heatmap

    # Coinciding boxes: the second label goes below the first instead of over it.
    big = Image.new("RGB", (200, 150), (128, 128, 128))
    out = np.asarray(cam_overlay(big, cam, [[0, 0, 200, 150]] * 2, labels=["1%", "10%"]))
    inner = out[4:-4, 4:60]  # inside the box outlines

    def rows_with(colour):
        return np.nonzero(np.all(inner == colour, axis=-1).any(axis=1))[0]

    first, second = rows_with(BOX_COLOURS[0]), rows_with(BOX_COLOURS[1])
    assert first.size and second.size and second.min() > first.max()

    with pytest.raises(ValueError, match="h×w"):
        cam_overlay(image, np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="T×4"):
        cam_overlay(image, cam, [[1, 2, 3]])
    with pytest.raises(ValueError, match="alpha"):
        cam_overlay(image, cam, alpha=2.0)


# ------------------------------------------------------------------------------ charts


def test_mean_pr_curve_interpolates_oxford_points():
    # Positives 0 and 2 of a 5-image ranking, junk 1 ignored: kept list 0, 2, 3, 4.
    prec, rec = precision_recall_points([0, 1, 2, 3, 4], positives=[0, 2], junk=[1])
    np.testing.assert_allclose(prec, [1.0, 1.0, 2 / 3, 0.5])
    np.testing.assert_allclose(rec, [0.5, 1.0, 1.0, 1.0])
    curve = mean_pr_curve([(prec, rec)])
    np.testing.assert_allclose(curve, np.ones(101))  # junk removed: a perfect ranking
    # A truncated ranking reaching half the positives: precision 0 beyond recall 0.5.
    p2, r2 = precision_recall_points([3, 0], positives=[0, 2])
    c2 = mean_pr_curve([(p2, r2)])
    assert c2[0] == pytest.approx(0.5) and c2[50] == pytest.approx(0.5) and c2[51] == 0.0
    np.testing.assert_allclose(mean_pr_curve([(prec, rec), (p2, r2)]), (curve + c2) / 2)
    # AP of the same list (Oxford trapezoid) agrees on the perfect case.
    assert average_precision([0, 1, 2, 3, 4], [0, 2], [1]) == pytest.approx(1.0)


def test_pr_curves_png_has_the_requested_size(tmp_path):
    rng = np.random.default_rng(0)
    curves = {
        m: [precision_recall_points(rng.permutation(20), [0, 1, 2], [3]) for _ in range(4)]
        for m in ("raw", "ofa")
    }
    img = pr_curves(curves, maps={"raw": 0.4, "ofa": 0.7}, size=(400, 300))
    path = save_png(img, tmp_path / "pr.png")
    with Image.open(path) as back:
        assert back.format == "PNG" and back.size == (400, 300)
    with pytest.raises(ValueError):
        pr_curves({})


def test_ap_bars_one_bar_per_query_and_method(tmp_path):
    aps = {m: {f"q{i}": (i + k) / 20 for i in range(7)} for k, m in enumerate(("raw", "ofa"))}
    aps["ofa"]["q3"] = float("nan")  # no positives: no bar
    fig = ap_bars_figure(aps)
    ax = fig.axes[0]
    assert len(ax.patches) == 7 * 2
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"q{i}" for i in range(7)]
    small = ap_bars(aps)
    assert small.size == (640, 480)
    many = ap_bars({"raw": {f"q{i}": 0.5 for i in range(80)}})
    assert many.width > small.width and many.height == 480


# ------------------------------------------------------------------------------ markdown


def test_data_uri_and_markdown_embed_small_pngs():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 1600, 3), np.uint8))
    uri = data_uri(img, max_width=400)
    assert uri.startswith("data:image/png;base64,")
    png = base64.b64decode(uri.split(",", 1)[1])
    with Image.open(io.BytesIO(png)) as back:
        assert back.format == "PNG" and back.size == (400, 75)
        assert back.mode == "P" and len(back.getcolors()) <= 128
    # A chart's few flat colours come through exactly.
    rng = np.random.default_rng(2)
    palette = rng.integers(0, 256, (20, 3), dtype=np.uint8)
    chart = palette[rng.integers(0, 20, (60, 80))]
    png = base64.b64decode(data_uri(Image.fromarray(chart)).split(",", 1)[1])
    with Image.open(io.BytesIO(png)) as back:
        assert np.array_equal(np.asarray(back.convert("RGB")), chart)
    report = {
        "evaluation": "ev",
        "database_images": 3,
        "distractors": [],
        "backbone": "b",
        "results": [{"method": "ofa", "map": 0.5, "paper": 0.712}],
    }
    md = reports.markdown(report, [("cw-figure pr-curves", uri)])
    assert "| ofa | 0.5000 | 0.712 |" in md
    assert f"![cw-figure pr-curves]({uri})" in md
    assert reports.markdown(report).count("![") == 0


def test_charts_leave_pyplot_alone(monkeypatch):
    """The charts use Figure + the Agg canvas: importing pyplot (global figures and backend
    state) would fail here."""
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    p = (np.array([1.0, 0.5]), np.array([0.5, 0.5]))
    assert pr_curves({"m": [p]}, size=(200, 150)).size == (200, 150)
    assert ap_bars({"m": {"q": 0.5}}, height=150).size == (640, 150)
    with pytest.raises(ImportError):
        import matplotlib.pyplot  # noqa: F401  (the guard works)
