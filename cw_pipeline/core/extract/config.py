"""Extraction settings: :class:`ExtractionConfig` (what the stored features are; hashed into
``code_version()``) and :class:`RuntimeConfig` (how they are computed: device, threads, batch
limits), with their defaults."""

from __future__ import annotations

import hashlib
import json

import torch
from pydantic import Field, field_validator, model_validator

from cw_pipeline.core import images as imgs
from cw_pipeline.core.backbones import BACKBONES, DEFAULT_BACKBONE
from cw_pipeline.core.cams import BOX_THRESHOLDS
from cw_pipeline.core.validation import Settings, bounded_int

#: Default resize policy: the paper's 1024 as a cap on the long side, never enlarging.
DEFAULT_RESIZE = "max:1024"
#: Default pixel budget of one forward pass (8 images of 1024x1024, 10 of 1024x768).
DEFAULT_BATCH_PIXELS = 8 * 1024 * 1024
#: Input pixels that the CPU batches images up to (an image over it runs alone, up to
#: ``batch_pixels``): measured on 2 cores with freed memory kept (core/allocator.py), batches of
#: ~1 Mpx are as fast as 16 × 640×480 or 10 × 1024×768 ones, or faster, with a third of the
#: memory (benchmarks/indexing_throughput.py, memory_bound.py).
CPU_BATCH_TARGET_PIXELS = 1024 * 1024


class ExtractionConfig(Settings):
    """Everything that determines the stored features of an image (the YAML's extraction keys).

    ``stored_classes`` is N_C as stored: the class vectors kept per image (searches aggregate
    at most that many). ``code_version()`` hashes the settings: changing any of them but
    ``max_pixels`` marks stored features stale.
    """

    backbone: str = DEFAULT_BACKBONE
    layer: str | None = None
    weights: str | None = None
    resize: str = DEFAULT_RESIZE
    stored_classes: bounded_int(1, 1000) = 64  # type: ignore[valid-type]
    box_classes: bounded_int(1) = 2  # type: ignore[valid-type]
    thresholds: tuple[float, ...] = Field(default=BOX_THRESHOLDS, strict=False)
    max_pixels: bounded_int(1) | None = imgs.DEFAULT_MAX_PIXELS  # type: ignore[valid-type]

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r} (expected one of {sorted(BACKBONES)})")
        return value

    @field_validator("resize")
    @classmethod
    def _resize_policy(cls, value: str) -> str:
        imgs.ResizePolicy.parse(value)  # fail early on a bad policy string
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ExtractionConfig:
        layers = BACKBONES[self.backbone].layers
        if self.layer is not None and self.layer not in layers:
            raise ValueError(
                f"backbone {self.backbone!r} has no layer {self.layer!r} "
                f"(expected one of {list(layers)})"
            )
        if self.box_classes > self.stored_classes:
            raise ValueError(
                f"box_classes must be in 1..stored_classes ({self.stored_classes}), "
                f"got {self.box_classes}"
            )
        return self

    @property
    def resize_policy(self) -> imgs.ResizePolicy:
        return imgs.ResizePolicy.parse(self.resize)

    @property
    def resolved_layer(self) -> str:
        """``layer``, or the backbone's default layer when it is None."""
        return self.layer or BACKBONES[self.backbone].default_layer

    @property
    def feature_space(self) -> tuple[str, str, str | None]:
        """(backbone, layer, weights): settings with equal values have compatible features."""
        return (self.backbone, self.resolved_layer, self.weights)

    def code_version(self) -> str:
        """Short stable hash of the settings that change stored features.

        The payload keeps the names it was first computed with (``n_classes``), so renaming
        a field does not mark every stored feature stale.
        """
        payload = {
            "backbone": self.backbone,
            "layer": self.layer,
            "weights": self.weights,
            "resize": self.resize_policy.describe(),
            "n_classes": self.stored_classes,
            "box_classes": self.box_classes,
            "thresholds": list(self.thresholds),
        }
        digest = hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return f"{self.backbone}-{digest[:10]}"


class RuntimeConfig(Settings):
    """How features are computed, not what they are: device, threads, batch limits."""

    device: str = "cpu"
    num_threads: bounded_int(1) | None = None  # type: ignore[valid-type]
    batch_size: bounded_int(1) = 16  # type: ignore[valid-type]
    batch_pixels: bounded_int(1) = DEFAULT_BATCH_PIXELS  # type: ignore[valid-type]
    #: Pixels images are batched up to; None: ``CPU_BATCH_TARGET_PIXELS`` on the CPU,
    #: ``batch_pixels`` on an accelerator.
    batch_target_pixels: bounded_int(1) | None = None  # type: ignore[valid-type]

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        return valid_device(value)


def valid_device(value: str) -> str:
    """``value`` when torch parses it as a device (not whether it is present); ValueError
    naming it otherwise."""
    try:
        torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"invalid device {value!r} ({exc})") from None
    return value
