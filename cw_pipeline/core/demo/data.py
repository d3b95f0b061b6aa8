"""The demo's generated tables: which bundled photographs it uses, the instances of each half
(scene and object boxes in source pixels), the distractor regions, and the per-view-kind
geometry, clutter and photometry parameters. Pure data; rendering is in
:mod:`cw_pipeline.core.demo.render`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Box = tuple[float, float, float, float]
ViewKind = Literal["query", "good", "ok", "junk"]

# key -> (package, path inside the package)
SOURCE_FILES: dict[str, tuple[str, str]] = {
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


@dataclass(frozen=True)
class Instance:
    """An object: a ``scene`` region of a photo (views stay inside it) and its ``obj`` box."""

    name: str
    source: str
    scene: Box
    obj: Box
    alt_source: str | None = None  # another real photo of the same scene (stereo pair)


# Two instances of one photo use non-overlapping scenes. Boxes are source pixels.
HALF_A: tuple[Instance, ...] = (
    Instance("astronaut", "astronaut", (0, 0, 350, 512), (95, 10, 345, 330)),
    Instance("cat", "chelsea", (0, 0, 451, 300), (90, 20, 410, 300)),
    Instance(
        "motorcycle", "motorcycle_left", (0, 0, 741, 500), (90, 95, 690, 455), "motorcycle_right"
    ),
    Instance("pagoda", "china", (0, 0, 400, 427), (60, 25, 360, 395)),
    Instance("coins", "coins", (0, 0, 384, 303), (30, 15, 360, 290)),
    Instance("moon", "moon", (0, 0, 512, 512), (80, 40, 450, 470)),
    Instance("retina", "retina", (0, 0, 1411, 1411), (150, 200, 1250, 1250)),
    Instance("page", "page", (0, 0, 384, 191), (20, 10, 370, 185)),
)
HALF_B: tuple[Instance, ...] = (
    Instance("shuttle", "astronaut", (350, 0, 512, 345), (352, 0, 470, 290)),
    Instance("coffee", "coffee", (0, 0, 600, 400), (40, 30, 470, 390)),
    Instance("rocket", "rocket", (100, 0, 540, 427), (250, 100, 390, 427)),
    Instance("dahlia", "flower", (100, 0, 540, 370), (160, 80, 455, 365)),
    Instance("cameraman", "camera", (0, 0, 512, 512), (80, 30, 420, 500)),
    Instance("ihc", "ihc", (0, 0, 512, 512), (60, 60, 460, 460)),
    Instance("hubble", "hubble", (0, 0, 500, 436), (60, 50, 440, 390)),
    Instance("handwriting", "text", (0, 0, 448, 172), (15, 10, 435, 165)),
)
HALVES: dict[str, tuple[Instance, ...]] = {"demo-a": HALF_A, "demo-b": HALF_B}

# Distractor regions: photo content that no instance scene covers.
DISTRACTOR_REGIONS: tuple[tuple[str, Box | None], ...] = (
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
    return {name: tuple(i.name for i in half) for name, half in HALVES.items()}


@dataclass(frozen=True)
class Geometry:
    """How a view of one kind frames the object."""

    extent: tuple[float, float]  # object-size multiples (low, high)
    jitter: float  # centre jitter, fraction of the object size
    rotation: float  # degrees (max abs)
    perspective: float  # corner noise, fraction of the half extent
    out_scale: tuple[float, float]  # output longer side, fraction of ``size``


GEOMETRY: dict[ViewKind, Geometry] = {
    "query": Geometry((1.15, 1.45), 0.04, 4.0, 0.03, (1.0, 1.0)),
    "good": Geometry((0.95, 1.7), 0.12, 12.0, 0.08, (0.8, 1.0)),
    "ok": Geometry((0.65, 1.05), 0.2, 25.0, 0.15, (0.75, 1.0)),
    "junk": Geometry((0.3, 0.45), 0.0, 20.0, 0.1, (0.75, 1.0)),
}


@dataclass(frozen=True)
class Clutter:
    """How a view is set into a cluttered scene (the object no longer fills the frame)."""

    p: float  # probability that a view of this kind is composited at all
    scale: tuple[float, float]  # the view's size in the new frame (fraction of each side)
    p_occlusion: float  # probability of an occluding patch over the view
    occlusion: tuple[float, float]  # the patch's side, fraction of the view's sides


CLUTTER: dict[ViewKind, Clutter] = {
    "good": Clutter(0.5, (0.55, 0.8), 0.3, (0.25, 0.4)),
    "ok": Clutter(1.0, (0.4, 0.6), 0.7, (0.35, 0.5)),
}


@dataclass(frozen=True)
class Photometry:
    """Ranges of the lighting, colour, blur, noise and JPEG changes of one view kind."""

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


PHOTOMETRY: dict[ViewKind, Photometry] = {
    "query": Photometry(
        (0.92, 1.08), (0.92, 1.08), (0.9, 1.1), 0.03, (0.9, 1.1), 0.1, 0.0, 0.0, (0, 0),
        0.0, (0, 0), (90, 90),
    ),
    "good": Photometry(
        (0.75, 1.25), (0.8, 1.2), (0.8, 1.25), 0.06, (0.7, 1.3), 0.3, 0.0, 0.3, (0.5, 1.2),
        0.3, (0.01, 0.03), (70, 95),
    ),
    "ok": Photometry(
        (0.6, 1.4), (0.65, 1.3), (0.7, 1.4), 0.1, (0.4, 1.4), 0.5, 0.2, 0.5, (0.8, 2.0),
        0.5, (0.02, 0.05), (40, 80),
    ),
    "junk": Photometry(
        (0.75, 1.25), (0.8, 1.2), (0.8, 1.25), 0.06, (0.7, 1.3), 0.3, 0.0, 0.3, (0.5, 1.2),
        0.3, (0.01, 0.03), (60, 90),
    ),
}  # fmt: skip
