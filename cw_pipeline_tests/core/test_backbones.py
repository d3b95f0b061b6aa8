"""Tests for cw_pipeline.core.backbones (no network: packaged or random weights only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding
from PIL import Image
from sklearn.datasets import load_sample_image

from cw_pipeline.core.backbones import (
    BACKBONES,
    DEFAULT_BACKBONE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VGG16CAM,
    DeviceUnavailableError,
    _packaged_efficientnet_path,
    check_device,
    load_backbone,
    set_num_threads,
)
from cw_pipeline.core.extract import ExtractionConfig, FeatureExtractor
from cw_pipeline.core.images import center_crop, to_tensor


def _batch(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _packaged_state(variant: int) -> dict:
    return torch.load(_packaged_efficientnet_path(variant), map_location="cpu", weights_only=True)


def _assert_same_state(net: torch.nn.Module, state: dict) -> None:
    ours = net.state_dict()
    assert set(ours) == set(state)
    for key, value in state.items():
        assert torch.equal(ours[key].cpu(), value), key


@pytest.fixture(scope="module")
def resnet50_random():
    return load_backbone("resnet50", weights="random")


@pytest.fixture(scope="module")
def densenet161_random():
    return load_backbone("densenet161", weights="random")


@pytest.fixture(scope="module")
def vgg16_cam_random():
    return load_backbone("vgg16_cam", weights="random")


# --------------------------------------------------------------------------- EfficientNet-Lite


def test_default_backbone_loads_packaged_weights_strictly(lite0):
    assert DEFAULT_BACKBONE == "efficientnet_lite0"
    assert lite0.name == "efficientnet_lite0"
    assert lite0.layer == "head"
    assert lite0.weights == "packaged"
    assert lite0.describe() == "efficientnet_lite0:head:packaged"
    _assert_same_state(lite0.trunk.net, _packaged_state(0))
    assert not lite0.trunk.training
    assert lite0.stride == 32
    assert lite0.num_classes == 1000
    assert lite0.cam_dim == 1280
    assert lite0.feature_dim == 1280
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    assert torch.equal(lite0.classifier_weight, lite0.trunk.net._fc.weight)
    assert torch.equal(lite0.classifier_bias, lite0.trunk.net._fc.bias)
    # Dynamic TF-"same" padding everywhere a padded convolution is used.
    convs = [m for m in lite0.trunk.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(isinstance(m, Conv2dDynamicSamePadding) for m in convs)


@pytest.mark.parametrize("size", [(240, 320), (227, 301)])
def test_dynamic_padding_matches_static_model_built_for_that_size(lite0, size):
    h, w = size
    x = _batch(1, h, w, seed=h)
    ours = lite0.forward(x)
    state = _packaged_state(0)
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=(h, w))
    ref.load_state_dict(state, strict=True)
    ref.eval()
    assert any(isinstance(m, Conv2dStaticSamePadding) for m in ref.modules())
    static224 = EfficientNet.from_name("efficientnet-lite0", image_size=224)
    static224.load_state_dict(state, strict=True)
    static224.eval()
    with torch.no_grad():
        ref_logits = ref(x)
        ref_features = ref.extract_features(x)
        wrong_logits = static224(x)
    assert ours.logits.shape == (1, 1000)
    torch.testing.assert_close(ours.logits, ref_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.cam_maps, ref_features, atol=1e-4, rtol=0)
    # A network whose padding was fixed for 224×224 computes something else at this size,
    # so this test would catch static padding.
    assert (wrong_logits - ref_logits).abs().max() > 1e-2


def test_lite0_forward_matches_library_forward_and_probs(lite0):
    x = _batch(2, 64, 96, seed=1)
    out = lite0.forward(x)
    with torch.no_grad():
        library = lite0.trunk.net(x)
    torch.testing.assert_close(out.logits, library, atol=1e-4, rtol=0)
    assert out.features is out.cam_maps  # head: X is A
    assert out.features.shape == (2, 1280, 2, 3)
    torch.testing.assert_close(out.probs.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(out.probs, torch.softmax(library, dim=1), atol=1e-6, rtol=0)


def test_lite0_block_layer_gives_that_blocks_output():
    bb = load_backbone("efficientnet_lite0", layer="block15")
    captured = {}
    hook = bb.trunk.net._blocks[15].register_forward_hook(
        lambda mod, inp, out: captured.setdefault("x", out)
    )
    x = _batch(1, 64, 64, seed=2)
    try:
        with torch.no_grad():
            bb.trunk.net(x)
    finally:
        hook.remove()
    out = bb.forward(x)
    assert bb.layer == "block15"
    assert out.features.shape == captured["x"].shape == (1, 320, 2, 2)
    torch.testing.assert_close(out.features, captured["x"], atol=1e-5, rtol=0)
    assert out.cam_maps.shape == (1, 1280, 2, 2)
    assert bb.stride == 32


def test_lite2_loads_packaged_weights_strictly():
    bb = load_backbone("efficientnet_lite2")
    assert bb.weights == "packaged"
    _assert_same_state(bb.trunk.net, _packaged_state(2))
    out = bb.forward(_batch(1, 64, 64, seed=3))
    assert out.features.shape == (1, 1280, 2, 2)
    assert out.logits.shape == (1, 1000)
    assert bb.stride == 32


def test_efficientnet_has_no_torchvision_weights():
    with pytest.raises(ValueError, match="no torchvision weights"):
        load_backbone("efficientnet_lite0", weights="imagenet")


# --------------------------------------------------------------------------- torchvision nets


@pytest.mark.parametrize(
    ("fixture", "x_channels", "a_channels", "stride"),
    [
        ("resnet50_random", 2048, 2048, 32),
        ("densenet161_random", 2208, 2208, 32),
        ("vgg16_cam_random", 512, 1024, 16),
    ],
)
def test_random_torchvision_backbones_shapes_and_logits(
    request, fixture, x_channels, a_channels, stride
):
    bb = request.getfixturevalue(fixture)
    assert bb.weights == "random"
    assert bb.mean == IMAGENET_MEAN and bb.std == IMAGENET_STD
    assert bb.stride == stride
    assert bb.cam_dim == a_channels and bb.num_classes == 1000
    assert bb.feature_dim == x_channels
    x = _batch(2, 64, 64, seed=4)
    out = bb.forward(x)
    side = 64 // stride
    assert out.features.shape == (2, x_channels, side, side)
    a_side = 64 // (16 if fixture == "vgg16_cam_random" else 32)
    assert out.cam_maps.shape == (2, a_channels, a_side, a_side)
    assert out.logits.shape == out.probs.shape == (2, 1000)
    gap = out.cam_maps.mean(dim=(2, 3))
    torch.testing.assert_close(
        out.logits, gap @ bb.classifier_weight.T + bb.classifier_bias, atol=1e-4, rtol=0
    )
    with torch.no_grad():
        library = bb.trunk.net(x)  # the network's own forward
    torch.testing.assert_close(out.logits, library, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.probs.sum(dim=1), torch.ones(2))
    assert (out.probs >= 0).all()


def test_vgg16_cam_x_is_conv5_1(vgg16_cam_random):
    bb = vgg16_cam_random
    assert bb.layer == "conv5_1"
    x = _batch(1, 64, 48, seed=5)
    out = bb.forward(x)
    with torch.no_grad():
        # torchvision's vgg16().features: conv5_1 is index 24, its ReLU 25.
        conv5_1 = bb.trunk.net.features[: VGG16CAM.CONV5_1 + 1](x)
    assert isinstance(bb.trunk.net.features[24], torch.nn.Conv2d)
    assert isinstance(bb.trunk.net.features[25], torch.nn.ReLU)
    assert out.features.shape == (1, 512, 4, 3)
    torch.testing.assert_close(out.features, conv5_1)
    # No pool5: A keeps the stride-16 grid.
    assert out.cam_maps.shape == (1, 1024, 4, 3)


def test_vgg16_cam_other_layers(vgg16_cam_random):
    bb = vgg16_cam_random
    x = _batch(1, 32, 32, seed=6)
    try:
        bb.trunk.layer = "cam"
        cam = bb.forward(x)
        bb.trunk.layer = "conv5_3"
        conv5_3 = bb.forward(x)
    finally:
        bb.trunk.layer = "conv5_1"
    assert torch.equal(cam.features, cam.cam_maps)
    with torch.no_grad():
        ref = bb.trunk.net.features(x)
    assert conv5_3.features.shape == (1, 512, 2, 2)
    torch.testing.assert_close(conv5_3.features, ref)


def test_vgg16_cam_without_weights_raises_helpful_error():
    with pytest.raises(ValueError, match=r"vgg16_cam has no public PyTorch weights.*weights="):
        load_backbone("vgg16_cam")
    with pytest.raises(ValueError, match="state-dict file"):
        load_backbone("vgg16_cam", weights="imagenet")


def test_resnet50_layer3_and_seeded_random_weights(resnet50_random):
    bb = load_backbone("resnet50", layer="layer3", weights="random")  # same seed 0
    x = _batch(1, 64, 64, seed=7)
    out = bb.forward(x)
    ref = resnet50_random.forward(x)
    assert bb.stride == 16
    assert bb.feature_dim == 1024
    assert out.features.shape == (1, 1024, 4, 4)
    net = resnet50_random.trunk.net
    with torch.no_grad():
        layer3 = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
    torch.testing.assert_close(out.features, layer3, atol=1e-5, rtol=1e-5)
    # Same seed, same random weights: A and logits agree.
    torch.testing.assert_close(out.cam_maps, ref.cam_maps)
    torch.testing.assert_close(out.logits, ref.logits)


def test_state_dict_file_round_trip(tmp_path, resnet50_random):
    source = load_backbone("resnet50", weights="random", seed=1)
    path = tmp_path / "resnet50-test.pth"
    torch.save(source.trunk.net.state_dict(), path)
    loaded = load_backbone("resnet50", weights=path)
    assert loaded.weights == "resnet50-test.pth"
    assert loaded.describe() == "resnet50:layer4:resnet50-test.pth"
    x = _batch(1, 64, 64, seed=8)
    a, b = source.forward(x), loaded.forward(x)
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.features, a.features)
    # The weights really came from the file: the default seed gives other ones.
    assert not torch.allclose(resnet50_random.forward(x).logits, a.logits)


def test_state_dict_file_wrapped_in_state_dict_key(tmp_path):
    source = load_backbone("efficientnet_lite0", weights="random", seed=3)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": source.trunk.net.state_dict()}, path)
    loaded = load_backbone("efficientnet_lite0", weights=str(path))
    _assert_same_state(loaded.trunk.net, source.trunk.net.state_dict())


@pytest.mark.parametrize(
    "content",
    [
        {"foo": torch.zeros(2)},  # a state dict of another network
        torch.zeros(3),  # a tensor, not a state dict
        b"definitely not a torch file",  # not a torch file at all
    ],
    ids=["other-network", "tensor", "garbage"],
)
def test_wrong_state_dict_file_raises_value_error_naming_it(tmp_path, content):
    path = tmp_path / "wrong-weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=r"wrong-weights\.pth"):
        load_backbone("efficientnet_lite0", weights=path)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.pth"):
        load_backbone("resnet50", weights=tmp_path / "nothere.pth")


def test_unknown_backbone_and_layer():
    with pytest.raises(ValueError, match=r"unknown backbone 'alexnet'.*efficientnet_lite0"):
        load_backbone("alexnet")
    with pytest.raises(ValueError, match=r"backbone 'resnet50' has no layer 'layer9'"):
        load_backbone("resnet50", layer="layer9", weights="random")
    with pytest.raises(ValueError, match="'block99'"):
        load_backbone("efficientnet_lite0", layer="block99")


def test_registry_lists_the_backbones():
    assert set(BACKBONES) == {
        "efficientnet_lite0",
        "efficientnet_lite2",
        "resnet50",
        "densenet161",
        "vgg16_cam",
    }
    for spec in BACKBONES.values():
        assert spec.default_layer in spec.layers


def test_input_smaller_than_stride_raises(lite0):
    with pytest.raises(ValueError, match=r"\(20, 64\) is smaller than the stride 32"):
        lite0.forward(torch.zeros(1, 3, 20, 64))
    with pytest.raises(ValueError, match="N×3×H×W"):
        lite0.forward(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="N×3×H×W"):
        lite0.forward(torch.zeros(1, 1, 64, 64))


def test_set_num_threads_validates():
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        set_num_threads(0)
    before = torch.get_num_threads()
    set_num_threads(None)
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------- acceptance


def test_default_backbone_recognises_a_palace(lite0):
    """ImageNet class 698 ("palace") is in the top 3 for scikit-learn's china.jpg."""
    image = center_crop(Image.fromarray(load_sample_image("china.jpg")), 224)
    assert image.size == (224, 224)
    extractor = FeatureExtractor(
        ExtractionConfig(resize="native", stored_classes=5), backbone=lite0
    )
    record = extractor.extract_images([image])[0]
    assert 698 in record.class_ids[:3].tolist()
    # Same answer from the backbone directly (inputs normalised with mean = std = 0.5).
    out = lite0.forward(to_tensor([image], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    top3 = torch.topk(out.probs[0], 3).indices.tolist()
    assert 698 in top3
    np.testing.assert_array_equal(record.class_ids[:3], top3)


@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("cuda", r"device 'cuda' requested but CUDA is not available on this machine"),
        ("cuda:1", r"device 'cuda:1' requested but CUDA is not available"),
        ("mps", r"device 'mps' requested but MPS \(Apple GPU\) is not available"),
        ("gpu0", r"invalid device 'gpu0' .*expected cpu, cuda, cuda:N or mps"),
        ("meta", r"unsupported device 'meta': expected one of cpu, cuda, mps"),
    ],
)
def test_unavailable_devices_are_refused_before_any_work(monkeypatch, device, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match=match) as info:
        check_device(device)
    assert "\n" not in str(info.value)
    with pytest.raises(DeviceUnavailableError, match=match):  # before the network is built
        load_backbone("efficientnet_lite0", weights="no-such-file.pth", device=device)


def test_a_cuda_index_past_the_last_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceUnavailableError, match=r"'cuda:2' .* has 2 CUDA device\(s\)"):
        check_device("cuda:2")
