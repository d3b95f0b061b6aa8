"""Rendering the demo in memory: bundled photographs read from disk (never downloaded), views
warped by random homographies, set into clutter, changed in lighting and colour, JPEG-encoded;
each image from its own Generator seeded by ``(seed, crc32(name))``."""

from __future__ import annotations

import importlib.util
import io
import math
import zlib
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from cw_pipeline.core.demo.data import (
    CLUTTER,
    DISTRACTOR_REGIONS,
    GEOMETRY,
    HALVES,
    PHOTOMETRY,
    SOURCE_FILES,
    Box,
    Instance,
    ViewKind,
)

_JPEG_QUALITY_QUERY = 90


def _package_file(package: str, relpath: str) -> Path:
    """Path of a data file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"demo data needs the installed package {package!r}")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.is_file():
        raise FileNotFoundError(f"demo source photo missing from {package}: {path}")
    return path


@cache
def _source_array(key: str) -> np.ndarray:
    """RGB uint8 array of a bundled photograph (cached; callers must not modify it)."""
    if key.startswith("lfw"):
        # "lfw<k>": a 4×4 mosaic of 16 Labeled-Faces-in-the-Wild crops (25×25 each).
        k = int(key[3:])
        faces = np.load(_package_file(*SOURCE_FILES["lfw"]), allow_pickle=False)
        tiles = faces[16 * k : 16 * (k + 1)]
        rows = [np.concatenate(list(tiles[r * 4 : r * 4 + 4]), axis=1) for r in range(4)]
        grey = np.rint(np.clip(np.concatenate(rows, axis=0), 0.0, 1.0) * 255).astype(np.uint8)
        arr = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        with Image.open(_package_file(*SOURCE_FILES[key])) as img:
            arr = np.asarray(img.convert("RGB"))
    arr.setflags(write=False)
    return arr


def _source_image(key: str, region: Box | None = None) -> Image.Image:
    img = Image.fromarray(_source_array(key))
    if region is not None:
        img = img.crop(tuple(int(v) for v in region))
    return img


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A random crop of a distractor region, resized to ``width`` × ``height``."""
    source, region = DISTRACTOR_REGIONS[int(rng.integers(len(DISTRACTOR_REGIONS)))]
    img = _source_image(source, region)
    frac = rng.uniform(0.5, 1.0)
    aspect = width / height
    cw = min(img.width, img.height * aspect) * frac
    ch = cw / aspect
    x0 = rng.uniform(0, img.width - cw)
    y0 = rng.uniform(0, img.height - ch)
    box = (x0, y0, x0 + cw, y0 + ch)
    return img.convert("RGB").resize((width, height), Image.Resampling.LANCZOS, box=box)


def _clutter(rng: np.random.Generator, view: Image.Image, kind: ViewKind) -> Image.Image:
    """Set ``view`` into a background from the distractor photos, maybe partly occluded.

    The frame keeps ``view``'s size; the object shrinks to ``scale`` of it. Distractor images
    come from the same photos, so background content is shared with negatives: this is what
    makes sum-pooling over the whole frame confusable, and CAM weighting worth having.
    """
    c = CLUTTER.get(kind)
    if c is None or rng.random() >= c.p:
        return view
    w, h = view.size
    canvas = _background(rng, w, h)
    s = rng.uniform(*c.scale)
    vw, vh = max(8, round(w * s)), max(8, round(h * s))
    small = view.resize((vw, vh), Image.Resampling.LANCZOS)
    x, y = int(rng.integers(0, w - vw + 1)), int(rng.integers(0, h - vh + 1))
    canvas.paste(small, (x, y))
    if rng.random() < c.p_occlusion:
        ow = max(4, round(vw * rng.uniform(*c.occlusion)))
        oh = max(4, round(vh * rng.uniform(*c.occlusion)))
        patch = _background(rng, ow, oh)
        px = x + int(rng.integers(0, vw - ow + 1))
        py = y + int(rng.integers(0, vh - oh + 1))
        canvas.paste(patch, (px, py))
    return canvas


def _fit_quad(quad: np.ndarray, width: float, height: float) -> np.ndarray:
    """Shift, then shrink about its centre, a 4×2 quad until it lies inside the image."""
    quad = quad.copy()
    for _ in range(2):
        lo, hi = quad.min(axis=0), quad.max(axis=0)
        span = hi - lo
        limit = np.array([width, height], dtype=np.float64)
        factor = float(min(1.0, *(limit / np.maximum(span, 1e-9))))
        if factor < 1.0:
            centre = quad.mean(axis=0)
            quad = centre + (quad - centre) * factor * 0.999
            lo, hi = quad.min(axis=0), quad.max(axis=0)
        shift = np.maximum(0.0, -lo) - np.maximum(0.0, hi - limit)
        quad = quad + shift
    return np.clip(quad, 0.0, [width, height])


def _view_quad(
    rng: np.random.Generator, obj: Box, width: int, height: int, kind: ViewKind
) -> np.ndarray:
    """The scene quadrilateral (TL, TR, BR, BL) a view of ``kind`` shows."""
    g = GEOMETRY[kind]
    x1, y1, x2, y2 = obj
    ow, oh = x2 - x1, y2 - y1
    ext = rng.uniform(*g.extent)
    hx = ext * ow / 2
    hy = ext * oh / 2 * math.exp(rng.normal(0.0, 0.08))
    cx = (x1 + x2) / 2 + g.jitter * ow * rng.uniform(-1, 1)
    cy = (y1 + y2) / 2 + g.jitter * oh * rng.uniform(-1, 1)
    if kind == "junk":  # a corner of the object: well under 25% of it is visible
        sx, sy = rng.choice([-1.0, 1.0], size=2)
        cx += sx * (ow / 2 - hx * 0.6)
        cy += sy * (oh / 2 - hy * 0.6)
    theta = math.radians(rng.uniform(-g.rotation, g.rotation))
    rect = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]], dtype=np.float64)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    noise = rng.normal(0.0, g.perspective * min(hx, hy), size=(4, 2))
    noise = np.clip(noise, -2.5 * g.perspective * min(hx, hy), 2.5 * g.perspective * min(hx, hy))
    quad = rect @ rot.T + noise + np.array([cx, cy])
    return _fit_quad(quad, float(width), float(height))


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3×3 matrix H with ``dst ~ H @ [src, 1]`` for four point pairs."""
    a = np.zeros((8, 8), dtype=np.float64)
    b = np.zeros(8, dtype=np.float64)
    for i, ((x, y), (u, v)) in enumerate(zip(src, dst, strict=True)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * i], b[2 * i + 1] = u, v
    return np.append(np.linalg.solve(a, b), 1.0).reshape(3, 3)


def _output_size(quad: np.ndarray, long_side: int) -> tuple[int, int]:
    top, bottom = np.linalg.norm(quad[1] - quad[0]), np.linalg.norm(quad[2] - quad[3])
    left, right = np.linalg.norm(quad[3] - quad[0]), np.linalg.norm(quad[2] - quad[1])
    w, h = (top + bottom) / 2, (left + right) / 2
    if w >= h:
        return long_side, max(32, round(long_side * h / w))
    return max(32, round(long_side * w / h)), long_side


def _warp(scene: Image.Image, quad: np.ndarray, long_side: int) -> tuple[Image.Image, np.ndarray]:
    """Render ``quad`` of ``scene``; return the image and H mapping scene -> output pixels."""
    out_w, out_h = _output_size(quad, long_side)
    corners = np.array([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]], dtype=np.float64)
    # Shrink the scene first when the view downsamples a lot (a warp does not antialias).
    span = float(np.max(quad.max(axis=0) - quad.min(axis=0)))
    reduce = span / (1.25 * max(out_w, out_h))
    src, q = scene, quad
    if reduce > 1.0:
        size = (max(1, round(scene.width / reduce)), max(1, round(scene.height / reduce)))
        src = scene.resize(size, Image.Resampling.LANCZOS)
        q = quad * np.array([size[0] / scene.width, size[1] / scene.height])
    out_to_src = _homography(corners, q)
    coeffs = tuple(float(c) for c in (out_to_src / out_to_src[2, 2]).reshape(-1)[:8])
    img = src.transform(
        (out_w, out_h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC
    )
    return img, _homography(quad, corners)


def _map_box(h: np.ndarray, box: Box, width: int, height: int) -> Box | None:
    """Bounding box of ``box`` mapped by ``h``, clipped to the image (None if outside)."""
    x1, y1, x2, y2 = box
    pts = np.array([[x1, y1, 1], [x2, y1, 1], [x2, y2, 1], [x1, y2, 1]], dtype=np.float64)
    mapped = pts @ h.T
    xy = mapped[:, :2] / mapped[:, 2:3]
    lo = np.clip(xy.min(axis=0), 0, [width, height])
    hi = np.clip(xy.max(axis=0), 0, [width, height])
    if hi[0] - lo[0] < 1 or hi[1] - lo[1] < 1:
        return None
    return (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))


_LUMA = np.array([0.299, 0.587, 0.114])


def _photometric(rng: np.random.Generator, img: Image.Image, kind: ViewKind) -> Image.Image:
    """Lighting, colour, blur and noise changes (all drawn from ``rng``)."""
    p = PHOTOMETRY[kind]
    arr = np.asarray(img, dtype=np.float64) / 255.0
    h, w = arr.shape[:2]
    mean = float(arr.mean())
    arr = (arr - mean) * rng.uniform(*p.contrast) + mean
    arr *= rng.uniform(*p.brightness) * np.exp(rng.normal(0.0, p.colour, size=3))
    gx, gy = rng.uniform(-p.ramp, p.ramp, size=2)
    xs = np.linspace(-0.5, 0.5, w)[None, :, None]
    ys = np.linspace(-0.5, 0.5, h)[:, None, None]
    arr *= np.maximum(0.2, 1.0 + gx * xs + gy * ys)
    grey = (arr @ _LUMA)[:, :, None]
    saturation = 0.0 if rng.random() < p.p_grey else rng.uniform(*p.saturation)
    arr = grey + saturation * (arr - grey)
    arr = np.clip(arr, 0.0, 1.0) ** rng.uniform(*p.gamma)
    if rng.random() < p.p_noise:
        arr = arr + rng.normal(0.0, rng.uniform(*p.noise), size=arr.shape)
    out = Image.fromarray(np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")
    if rng.random() < p.p_blur:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*p.blur))))
    return out


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(quality), subsampling=2, optimize=False, progressive=False)
    return buf.getvalue()


def _rng(seed: int, name: str) -> np.random.Generator:
    """A Generator that depends only on the seed and the image name."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


def _prepared_scene(source: str, scene: Box, obj: Box, size: int) -> tuple[Image.Image, Box]:
    """The scene crop, shrunk to at most ``2*size`` on its longer side, and the object box."""
    img = _source_image(source, scene)
    factor = min(1.0, 2 * size / max(img.size))
    ox1, oy1, ox2, oy2 = (
        obj[0] - scene[0],
        obj[1] - scene[1],
        obj[2] - scene[0],
        obj[3] - scene[1],
    )
    if factor < 1.0:
        new = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
        fx, fy = new[0] / img.width, new[1] / img.height
        img = img.resize(new, Image.Resampling.LANCZOS)
        ox1, ox2, oy1, oy2 = ox1 * fx, ox2 * fx, oy1 * fy, oy2 * fy
    return img, (ox1, oy1, ox2, oy2)


def _view_kinds(views: int) -> list[ViewKind]:
    n_ok = max(1, views // 3)
    return ["good"] * (views - n_ok) + ["ok"] * n_ok + ["junk"]


def _render_instance(
    inst: Instance, *, seed: int, views: int, size: int
) -> tuple[dict[str, bytes], dict[str, str]]:
    """JPEG files and ground-truth texts of one instance."""
    scene, obj = _prepared_scene(inst.source, inst.scene, inst.obj, size)
    alt = None
    if inst.alt_source is not None:
        alt = _prepared_scene(inst.alt_source, inst.scene, inst.obj, size)[0]
    images: dict[str, bytes] = {}
    lists: dict[str, list[str]] = {"good": [], "ok": [], "junk": []}

    qname = f"{inst.name}_000000"
    rng = _rng(seed, qname)
    quad = _view_quad(rng, obj, scene.width, scene.height, "query")
    img, h = _warp(scene, quad, size)
    box = _map_box(h, obj, img.width, img.height)
    if box is None:  # pragma: no cover - the query view always contains the object
        raise RuntimeError(f"demo query {qname}: object outside the view")
    images[qname] = _jpeg_bytes(_photometric(rng, img, "query"), _JPEG_QUALITY_QUERY)
    lists["good"].append(qname)

    for k, kind in enumerate(_view_kinds(views), start=1):
        name = f"{inst.name}_{k:06d}"
        rng = _rng(seed, name)
        src = alt if (alt is not None and k == 1) else scene
        quad = _view_quad(rng, obj, src.width, src.height, kind)
        long_side = round(size * rng.uniform(*GEOMETRY[kind].out_scale))
        img, _ = _warp(src, quad, long_side)
        img = _photometric(rng, _clutter(rng, img, kind), kind)
        images[name] = _jpeg_bytes(img, int(rng.integers(*PHOTOMETRY[kind].quality, endpoint=True)))
        lists[kind if kind != "query" else "good"].append(name)

    x1, y1, x2, y2 = box
    texts = {
        f"{inst.name}_1_query.txt": f"oxc1_{qname} {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}\n",
        **{f"{inst.name}_1_{f}.txt": "".join(f"{n}\n" for n in lists[f]) for f in lists},
    }
    return images, texts


def _render_distractor(name: str, region: tuple[str, Box | None], *, seed: int, size: int) -> bytes:
    rng = _rng(seed, name)
    scene = _source_image(*region)
    w, h = scene.size
    frac = rng.uniform(0.4, 1.0)
    bw, bh = w * frac * math.exp(rng.normal(0, 0.15)), h * frac
    cx, cy = (
        rng.uniform(bw / 2, max(bw / 2, w - bw / 2)),
        rng.uniform(bh / 2, max(bh / 2, h - bh / 2)),
    )
    pseudo_obj = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
    quad = _view_quad(rng, pseudo_obj, w, h, "ok")
    img, _ = _warp(scene, quad, round(size * rng.uniform(0.75, 1.0)))
    img = _photometric(rng, img, "ok")
    return _jpeg_bytes(img, int(rng.integers(*PHOTOMETRY["ok"].quality, endpoint=True)))


def build_half(name: str, *, seed: int, views: int, size: int) -> tuple[dict[str, bytes], int]:
    files: dict[str, bytes] = {}
    for inst in HALVES[name]:
        images, texts = _render_instance(inst, seed=seed, views=views, size=size)
        files.update({f"jpg/{n}.jpg": data for n, data in images.items()})
        files.update({f"gt/{n}": text.encode() for n, text in texts.items()})
    return files, len(HALVES[name])


def build_distractors(*, seed: int, size: int, count: int) -> tuple[dict[str, bytes], int]:
    files: dict[str, bytes] = {}
    for i in range(count):
        name = f"distractor_{i:03d}"
        region = DISTRACTOR_REGIONS[i % len(DISTRACTOR_REGIONS)]
        files[f"jpg/{name}.jpg"] = _render_distractor(name, region, seed=seed, size=size)
    return files, 0
