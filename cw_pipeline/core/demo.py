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
occluding patch (:func:`_clutter`), so that the demo separates methods. The motorcycle instance also
uses the real second photograph of its stereo pair for one view. Layout (Oxford format, read
by :func:`cw_pipeline.core.datasets.read_oxford_groundtruth`)::

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
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import math
import shutil
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageFilter

__all__ = [
    "DEMO_DATASETS",
    "DEMO_VERSION",
    "DemoDataset",
    "DemoInfo",
    "demo_instances",
    "generate_demo",
]

logger = logging.getLogger(__name__)

#: Bump whenever the generator's output changes: existing demos are then regenerated.
DEMO_VERSION = 2
#: The dataset folders :func:`generate_demo` writes under its root.
DEMO_DATASETS: tuple[str, ...] = ("demo-a", "demo-b", "demo-distractors")

Box = tuple[float, float, float, float]
ViewKind = Literal["query", "good", "ok", "junk"]

_MANIFEST = "manifest.json"
_GENERATOR = "cw_pipeline.core.demo"  # recorded in manifests (not __name__: may be __main__)
_JPEG_QUALITY_QUERY = 90


# --------------------------------------------------------------------------------------------
# sources: photographs shipped inside installed packages
# --------------------------------------------------------------------------------------------

# key -> (package, path inside the package)
_SOURCE_FILES: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "brick": ("skimage", "data/brick.png"),
    "camera": ("skimage", "data/camera.png"),
    "cell": ("skimage", "data/cell.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "clock_motion": ("skimage", "data/clock_motion.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "coins": ("skimage", "data/coins.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "moon": ("skimage", "data/moon.png"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "page": ("skimage", "data/page.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "text": ("skimage", "data/text.png"),
    "lfw": ("skimage", "data/lfw_subset.npy"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}


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
        faces = np.load(_package_file(*_SOURCE_FILES["lfw"]), allow_pickle=False)
        tiles = faces[16 * k : 16 * (k + 1)]
        rows = [np.concatenate(list(tiles[r * 4 : r * 4 + 4]), axis=1) for r in range(4)]
        grey = np.rint(np.clip(np.concatenate(rows, axis=0), 0.0, 1.0) * 255).astype(np.uint8)
        arr = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        with Image.open(_package_file(*_SOURCE_FILES[key])) as img:
            arr = np.asarray(img.convert("RGB"))
    arr.setflags(write=False)
    return arr


def _source_image(key: str, region: Box | None = None) -> Image.Image:
    img = Image.fromarray(_source_array(key))
    if region is not None:
        img = img.crop(tuple(int(v) for v in region))
    return img


@dataclass(frozen=True)
class _Instance:
    """An object: a ``scene`` region of a photo (views stay inside it) and its ``obj`` box."""

    name: str
    source: str
    scene: Box
    obj: Box
    alt_source: str | None = None  # another real photo of the same scene (stereo pair)


# Two instances of one photo use non-overlapping scenes. Boxes are source pixels.
_HALF_A: tuple[_Instance, ...] = (
    _Instance("astronaut", "astronaut", (0, 0, 350, 512), (95, 10, 345, 330)),
    _Instance("cat", "chelsea", (0, 0, 451, 300), (90, 20, 410, 300)),
    _Instance(
        "motorcycle", "motorcycle_left", (0, 0, 741, 500), (90, 95, 690, 455), "motorcycle_right"
    ),
    _Instance("pagoda", "china", (0, 0, 400, 427), (60, 25, 360, 395)),
    _Instance("coins", "coins", (0, 0, 384, 303), (30, 15, 360, 290)),
    _Instance("moon", "moon", (0, 0, 512, 512), (80, 40, 450, 470)),
    _Instance("retina", "retina", (0, 0, 1411, 1411), (150, 200, 1250, 1250)),
    _Instance("page", "page", (0, 0, 384, 191), (20, 10, 370, 185)),
)
_HALF_B: tuple[_Instance, ...] = (
    _Instance("shuttle", "astronaut", (350, 0, 512, 345), (352, 0, 470, 290)),
    _Instance("coffee", "coffee", (0, 0, 600, 400), (40, 30, 470, 390)),
    _Instance("rocket", "rocket", (100, 0, 540, 427), (250, 100, 390, 427)),
    _Instance("dahlia", "flower", (100, 0, 540, 370), (160, 80, 455, 365)),
    _Instance("cameraman", "camera", (0, 0, 512, 512), (80, 30, 420, 500)),
    _Instance("ihc", "ihc", (0, 0, 512, 512), (60, 60, 460, 460)),
    _Instance("hubble", "hubble", (0, 0, 500, 436), (60, 50, 440, 390)),
    _Instance("handwriting", "text", (0, 0, 448, 172), (15, 10, 435, 165)),
)
_HALVES: dict[str, tuple[_Instance, ...]] = {"demo-a": _HALF_A, "demo-b": _HALF_B}

# Distractor regions: photo content that no instance scene covers.
_DISTRACTOR_REGIONS: tuple[tuple[str, Box | None], ...] = (
    ("brick", None),
    ("grass", None),
    ("gravel", None),
    ("cell", None),
    ("clock_motion", None),
    ("hubble", (500, 0, 1000, 436)),
    ("hubble", (0, 436, 500, 872)),
    ("hubble", (500, 436, 1000, 872)),
    ("china", (400, 0, 640, 427)),  # lake and trees beside the pagoda scene
    ("astronaut", (350, 345, 512, 512)),  # the helmet, below the shuttle scene
    *((f"lfw{k}", None) for k in range(6)),  # mosaics of 16 LFW faces each
)


def demo_instances() -> dict[str, tuple[str, ...]]:
    """Instance names of each demo half (``{"demo-a": (...), "demo-b": (...)}``)."""
    return {name: tuple(i.name for i in half) for name, half in _HALVES.items()}


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    extent: tuple[float, float]  # object-size multiples (low, high)
    jitter: float  # centre jitter, fraction of the object size
    rotation: float  # degrees (max abs)
    perspective: float  # corner noise, fraction of the half extent
    out_scale: tuple[float, float]  # output longer side, fraction of ``size``


_GEOMETRY: dict[ViewKind, _Geometry] = {
    "query": _Geometry((1.15, 1.45), 0.04, 4.0, 0.03, (1.0, 1.0)),
    "good": _Geometry((0.95, 1.7), 0.12, 12.0, 0.08, (0.8, 1.0)),
    "ok": _Geometry((0.65, 1.05), 0.2, 25.0, 0.15, (0.75, 1.0)),
    "junk": _Geometry((0.3, 0.45), 0.0, 20.0, 0.1, (0.75, 1.0)),
}


@dataclass(frozen=True)
class _Clutter:
    """How a view is set into a cluttered scene (the object no longer fills the frame)."""

    p: float  # probability that a view of this kind is composited at all
    scale: tuple[float, float]  # the view's size in the new frame (fraction of each side)
    p_occlusion: float  # probability of an occluding patch over the view
    occlusion: tuple[float, float]  # the patch's side, fraction of the view's sides


_CLUTTER: dict[ViewKind, _Clutter] = {
    "good": _Clutter(0.5, (0.55, 0.8), 0.3, (0.25, 0.4)),
    "ok": _Clutter(1.0, (0.4, 0.6), 0.7, (0.35, 0.5)),
}


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A random crop of a distractor region, resized to ``width`` × ``height``."""
    source, region = _DISTRACTOR_REGIONS[int(rng.integers(len(_DISTRACTOR_REGIONS)))]
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
    c = _CLUTTER.get(kind)
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
    g = _GEOMETRY[kind]
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


# --------------------------------------------------------------------------------------------
# photometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Photometry:
    brightness: tuple[float, float]
    contrast: tuple[float, float]
    gamma: tuple[float, float]
    colour: float  # std of per-channel log gains
    saturation: tuple[float, float]
    ramp: float  # max lighting gradient across the image
    p_grey: float
    p_blur: float
    blur: tuple[float, float]
    p_noise: float
    noise: tuple[float, float]
    quality: tuple[int, int]


_PHOTOMETRY: dict[ViewKind, _Photometry] = {
    "query": _Photometry(
        (0.92, 1.08), (0.92, 1.08), (0.9, 1.1), 0.03, (0.9, 1.1), 0.1, 0.0, 0.0, (0, 0),
        0.0, (0, 0), (90, 90),
    ),
    "good": _Photometry(
        (0.75, 1.25), (0.8, 1.2), (0.8, 1.25), 0.06, (0.7, 1.3), 0.3, 0.0, 0.3, (0.5, 1.2),
        0.3, (0.01, 0.03), (70, 95),
    ),
    "ok": _Photometry(
        (0.6, 1.4), (0.65, 1.3), (0.7, 1.4), 0.1, (0.4, 1.4), 0.5, 0.2, 0.5, (0.8, 2.0),
        0.5, (0.02, 0.05), (40, 80),
    ),
    "junk": _Photometry(
        (0.75, 1.25), (0.8, 1.2), (0.8, 1.25), 0.06, (0.7, 1.3), 0.3, 0.0, 0.3, (0.5, 1.2),
        0.3, (0.01, 0.03), (60, 90),
    ),
}  # fmt: skip

_LUMA = np.array([0.299, 0.587, 0.114])


def _photometric(rng: np.random.Generator, img: Image.Image, kind: ViewKind) -> Image.Image:
    """Lighting, colour, blur and noise changes (all drawn from ``rng``)."""
    p = _PHOTOMETRY[kind]
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


# --------------------------------------------------------------------------------------------
# building the datasets in memory
# --------------------------------------------------------------------------------------------


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
    inst: _Instance, *, seed: int, views: int, size: int
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
        long_side = round(size * rng.uniform(*_GEOMETRY[kind].out_scale))
        img, _ = _warp(src, quad, long_side)
        img = _photometric(rng, _clutter(rng, img, kind), kind)
        images[name] = _jpeg_bytes(
            img, int(rng.integers(*_PHOTOMETRY[kind].quality, endpoint=True))
        )
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
    return _jpeg_bytes(img, int(rng.integers(*_PHOTOMETRY["ok"].quality, endpoint=True)))


def _build_half(name: str, *, seed: int, views: int, size: int) -> tuple[dict[str, bytes], int]:
    files: dict[str, bytes] = {}
    for inst in _HALVES[name]:
        images, texts = _render_instance(inst, seed=seed, views=views, size=size)
        files.update({f"jpg/{n}.jpg": data for n, data in images.items()})
        files.update({f"gt/{n}": text.encode() for n, text in texts.items()})
    return files, len(_HALVES[name])


def _build_distractors(*, seed: int, size: int, count: int) -> tuple[dict[str, bytes], int]:
    files: dict[str, bytes] = {}
    for i in range(count):
        name = f"distractor_{i:03d}"
        region = _DISTRACTOR_REGIONS[i % len(_DISTRACTOR_REGIONS)]
        files[f"jpg/{name}.jpg"] = _render_distractor(name, region, seed=seed, size=size)
    return files, 0


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoDataset:
    """One generated demo folder."""

    name: str
    folder: Path  #: ``root/<name>``
    images: Path  #: ``root/<name>/jpg``
    groundtruth: Path | None  #: ``root/<name>/gt`` (None for the distractors)
    n_images: int
    n_queries: int
    instances: tuple[str, ...]
    generated: bool  #: False when an identical complete folder was already there


@dataclass(frozen=True)
class DemoInfo:
    """What :func:`generate_demo` produced (or found complete)."""

    root: Path
    seed: int
    views: int
    size: int
    datasets: dict[str, DemoDataset]

    @property
    def n_images(self) -> int:
        return sum(d.n_images for d in self.datasets.values())

    @property
    def n_instances(self) -> int:
        return sum(len(d.instances) for d in self.datasets.values())

    @property
    def generated(self) -> tuple[str, ...]:
        """Names of the datasets written by this call."""
        return tuple(n for n, d in self.datasets.items() if d.generated)


def _params(name: str, *, seed: int, views: int, size: int, n_distractors: int) -> dict[str, Any]:
    params: dict[str, Any] = {"version": DEMO_VERSION, "dataset": name, "seed": seed, "size": size}
    if name == "demo-distractors":
        params["n_distractors"] = n_distractors
    else:
        params["views"] = views
    return params


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, params: dict[str, Any]) -> bool:
    """True when ``folder`` holds a manifest with ``params`` and all its files, sizes intact."""
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("params") != params:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict):
        return False
    for rel, entry in files.items():
        try:
            if (folder / rel).stat().st_size != entry["bytes"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def _foreign_files(folder: Path) -> list[str]:
    """Files under ``folder`` that this generator did not write (or that changed since).

    A file is the generator's when the folder's manifest lists it with the same sha1; the
    manifest itself counts as the generator's. Without a generator manifest every file is
    foreign.
    """
    manifest = _read_manifest(folder)
    listed: dict[str, Any] = {}
    if manifest is not None and manifest.get("generator") == _GENERATOR:
        files = manifest.get("files")
        listed = files if isinstance(files, dict) else {}
    foreign = []
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(folder).as_posix()
        if rel == _MANIFEST and listed:
            continue
        entry = listed.get(rel)
        if not isinstance(entry, dict) or path.is_symlink() or not path.is_file():
            foreign.append(rel)
        elif hashlib.sha1(path.read_bytes()).hexdigest() != entry.get("sha1"):
            foreign.append(rel)
    return foreign


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a folder holding any file the generator did not write unchanged."""
    if not folder.exists():
        return
    foreign = _foreign_files(folder)
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise FileExistsError(
            f"{folder} holds {len(foreign)} file(s) that the demo generator did not write "
            f"(added or edited since: {shown}); refusing to regenerate it. Move them away, or "
            "choose another demo root"
        )


def _differences(folder: Path, params: dict[str, Any]) -> str:
    """How a kept demo folder differs from what the generator would write (for the log)."""
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("generator") != _GENERATOR:
        return "it has no manifest from the generator"
    parts = []
    if manifest.get("params") != params:
        parts.append(f"generated with {manifest.get('params')}, not {params}")
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    missing = [r for r in files if not (folder / r).exists()]
    foreign = _foreign_files(folder)
    if foreign:
        parts.append(f"{len(foreign)} file(s) added or edited")
    if missing:
        parts.append(f"{len(missing)} file(s) removed")
    return "; ".join(parts) or "nothing"


def _write_atomically(root: Path, name: str, files: dict[str, bytes], manifest: dict) -> None:
    """Write ``files`` + manifest into a temporary sibling of ``root/name``, then rename."""
    final = root / name
    tmp = root / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        for rel, data in sorted(files.items()):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if name != "demo-distractors":
            (tmp / "gt").mkdir(exist_ok=True)
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        (tmp / _MANIFEST).write_text(text, encoding="utf-8")
        old: Path | None = None
        if final.exists():
            old = root / f".{name}.{uuid.uuid4().hex}.old"
            final.rename(old)
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished first: keep its copy if it is what we wanted.
            if not _is_complete(final, manifest["params"]):
                raise
            logger.info("demo %s: written concurrently by another process", final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def generate_demo(
    root: Path | str,
    *,
    seed: int = 0,
    views: int = 5,
    size: int = 320,
    n_distractors: int = 40,
    only: Iterable[str] | None = None,
    regenerate: bool = False,
) -> DemoInfo:
    """Build the demo benchmark under ``root``: only dataset folders that do not exist yet.

    Args:
        root: parent folder of ``demo-a/``, ``demo-b/`` and ``demo-distractors/``.
        seed: seeds every random transform; output is byte-identical for equal parameters.
        views: positive views per instance besides the query (at least 4); a third of them
            (at least one) are hard and listed in ``_ok.txt``.
        size: longer side of the query images in pixels (views are 75-100% of it).
        n_distractors: number of distractor images.
        only: generate just these datasets (names from :data:`DEMO_DATASETS`).

        regenerate: rebuild dataset folders that differ from what these parameters give
            (other parameters, files removed) — refused, with nothing touched, when a folder
            holds any file the generator did not write unchanged.

    A dataset folder that exists is the user's data from then on: without ``regenerate`` it
    is never modified, whatever it holds (images added, edited or deleted are indexed as
    they are); only a missing or empty folder is generated. Nothing is ever deleted except
    files this generator wrote itself, unchanged, and only with ``regenerate``.
    """
    root = Path(root)
    if views < 4:
        raise ValueError(f"views must be >= 4, got {views}")
    if not 64 <= size <= 4096:
        raise ValueError(f"size must be in 64..4096, got {size}")
    if n_distractors < 0:
        raise ValueError(f"n_distractors must be >= 0, got {n_distractors}")
    names = DEMO_DATASETS if only is None else tuple(only)
    unknown = sorted(set(names) - set(DEMO_DATASETS))
    if unknown:
        raise ValueError(f"unknown demo dataset(s) {unknown}; expected some of {DEMO_DATASETS}")

    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, DemoDataset] = {}
    for name in DEMO_DATASETS:
        if name not in names:
            continue
        folder = root / name
        params = _params(name, seed=seed, views=views, size=size, n_distractors=n_distractors)
        generated = False
        exists = folder.exists() and (not folder.is_dir() or any(folder.iterdir()))
        if exists and not regenerate:
            if not _is_complete(folder, params):
                logger.info(
                    "demo %s kept as it is (%s); `cw-pipeline demo --regenerate` rebuilds it "
                    "when it holds only generated files",
                    folder,
                    _differences(folder, params),
                )
        elif not _is_complete(folder, params):
            _check_replaceable(folder)
            if name == "demo-distractors":
                files, n_queries = _build_distractors(seed=seed, size=size, count=n_distractors)
            else:
                files, n_queries = _build_half(name, seed=seed, views=views, size=size)
            manifest = {
                "generator": _GENERATOR,
                "params": params,
                "instances": list(demo_instances().get(name, ())),
                "n_queries": n_queries,
                "files": {
                    rel: {"bytes": len(data), "sha1": hashlib.sha1(data).hexdigest()}
                    for rel, data in sorted(files.items())
                },
            }
            _write_atomically(root, name, files, manifest)
            generated = True
            logger.info("demo: wrote %s (%d files)", folder, len(files))
        manifest = _read_manifest(folder) or {}
        n_images = sum(1 for p in (folder / "jpg").glob("*.jpg") if p.is_file())
        has_gt = name != "demo-distractors"
        out[name] = DemoDataset(
            name=name,
            folder=folder,
            images=folder / "jpg",
            groundtruth=folder / "gt" if has_gt else None,
            n_images=n_images,
            n_queries=int(manifest.get("n_queries", 0)),
            instances=tuple(manifest.get("instances", ())),
            generated=generated,
        )
    return DemoInfo(root=root, seed=seed, views=views, size=size, datasets=out)


def _main() -> None:  # pragma: no cover - convenience: python -m cw_pipeline.core.demo ROOT
    import sys

    logging.basicConfig(level=logging.INFO)
    info = generate_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo"))
    for d in info.datasets.values():
        print(f"{d.name}: {d.n_images} images, {d.n_queries} queries -> {d.images}")


if __name__ == "__main__":  # pragma: no cover
    _main()
