from functools import lru_cache
from urllib.error import URLError

import pytest
import torch
import torch.nn as nn
import torchvision

from medmeta.errors import ConfigError, MethodError
from medmeta.learning.models import (
    Classifier,
    MultiHeadModel,
    build_backbone,
    head_key,
    num_parameters,
    task_id_of,
)


def shared_backbone(arch: str = "resnet18", dims: int = 2, stem: str = "cifar") -> nn.Module:
    """One random-init backbone per configuration for tests that only run it in eval mode."""
    return _cached_backbone(arch, dims, stem)


@lru_cache(maxsize=None)
def _cached_backbone(arch: str, dims: int, stem: str) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(arch, dims=dims, stem=stem).eval()


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 28), (1, 64), (3, 64)])
def test_2d_feature_shapes(stem, channels, size):
    b = shared_backbone("resnet18", dims=2, stem=stem)
    assert b.out_features == 512
    n = 2 if size == 28 else 1
    out = features(b, torch.rand(n, channels, size, size))
    assert out.shape == (n, 512) and torch.isfinite(out).all()


def test_resnet50_features():
    b = build_backbone("resnet50", stem="cifar")
    assert b.out_features == 2048
    assert features(b, torch.rand(2, 1, 28, 28)).shape == (2, 2048)


@pytest.mark.parametrize("stem, size", [("cifar", 28), ("imagenet", 28), ("imagenet", 64)])
def test_3d_feature_shapes(stem, size):
    # (the cifar stem on 64^3 works too but costs ~5 s per volume on 2 CPU cores)
    b = shared_backbone("resnet18", dims=3, stem=stem)
    assert b.out_features == 512
    out = features(b, torch.rand(1, 1, size, size, size))
    assert out.shape == (1, 512) and torch.isfinite(out).all()


class StopForward(Exception):
    pass


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("stem, size, side", [("cifar", 28, 28), ("imagenet", 28, 7), ("cifar", 64, 64),
                                              ("imagenet", 64, 16)])
def test_stem_resolution(dims, stem, size, side):
    """The cifar stem keeps the input resolution; the imagenet stem (stride-2 conv + max-pool) quarters it."""
    b = shared_backbone(dims=dims, stem=stem)
    seen = {}

    def stop_after_stem(module, inputs, output):
        seen["shape"] = output.shape
        raise StopForward  # the rest of the network is not needed

    handle = b.maxpool.register_forward_hook(stop_after_stem)
    try:
        with pytest.raises(StopForward):
            features(b, torch.rand(*(1, 1) + (size,) * dims))
    finally:
        handle.remove()
    assert tuple(seen["shape"]) == (1, 64) + (side,) * dims


def test_grey_is_expanded_and_input_normalised():
    b = shared_backbone(stem="imagenet")
    grey = torch.rand(2, 1, 32, 32)
    assert torch.allclose(features(b, grey), features(b, grey.expand(-1, 3, -1, -1)), atol=1e-6)
    # forward == plain torchvision ResNet forward on ImageNet-normalised input
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rgb = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        ref = torchvision.models.ResNet.forward(b, (rgb - mean) / std)
    assert torch.allclose(features(b, rgb), ref, atol=1e-6)
    # normalisation buffers are not part of the state dict (torchvision keys only)
    assert set(b.state_dict()) == set(torchvision.models.resnet18().state_dict()) - {"fc.weight", "fc.bias"}


def test_wrong_input_channels_raise():
    with pytest.raises(ValueError, match="1 or 3"):
        shared_backbone()(torch.rand(1, 2, 28, 28))
    with pytest.raises(ValueError, match="B, 1, D, H, W"):
        shared_backbone(dims=3, stem="imagenet")(torch.rand(1, 3, 28, 28, 28))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": "resnet_nonsense"}, "unknown architecture"),
        ({"dims": 3, "conv3d": "4d"}, "conv3d"),
        ({"dims": 1}, "dims"),
        ({"stem": "tiny"}, "stem"),
        ({"dims": 3, "weights": "imagenet"}, "no published weights for 3D"),
        ({"dims": 3, "arch": "test_vit"}, "test_vit is a 2D architecture"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(**kwargs)


def test_local_torchvision_weights(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(ref.state_dict(), path)

    full = build_backbone("resnet18", stem="imagenet", weights=str(path))
    for name, tensor in ref.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(full.state_dict()[name], tensor), name

    # cifar stem: everything but the 7x7 conv1 is loaded; conv1 stays a fresh 3x3 conv
    cifar = build_backbone("resnet18", stem="cifar", weights=path)
    assert torch.equal(cifar.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    assert torch.equal(cifar.bn1.weight, ref.bn1.weight)
    assert cifar.conv1.weight.shape == (64, 3, 3, 3)


@pytest.mark.parametrize("dims, stem", [(2, "cifar"), (3, "imagenet")])
def test_backbone_state_dict_round_trip(tmp_path, dims, stem):
    """A saved backbone (cifar conv1 included) reloads through weights=path."""
    torch.manual_seed(2)
    src = build_backbone(dims=dims, stem=stem)
    path = tmp_path / "backbone.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(3)
    dst = build_backbone(dims=dims, stem=stem, weights=path)
    for name, tensor in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], tensor), name


def test_bad_local_weights(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match="nope.pth"):
        build_backbone(weights=missing)
    with pytest.raises(ConfigError, match="imagnet"):
        build_backbone(weights="imagnet")  # a typo is reported as a missing file, not ignored
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        build_backbone(weights=garbage)
    r18 = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), r18)
    with pytest.raises(ValueError, match=r"r18.pth' does not fit a resnet50 ResNet2d with the imagenet stem: key 'layer1.0.conv1.weight' has shape"):
        build_backbone("resnet50", weights=r18)
    with pytest.raises(ValueError, match="r18.pth"):
        build_backbone(dims=3, weights=r18)
    other = tmp_path / "other.pth"
    torch.save({"linear.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match="other.pth' does not fit a resnet18 ResNet2d.*unexpected key 'linear.weight'"):
        build_backbone(weights=other)


def test_imagenet_download_failure_is_explained(monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(MethodError, match="could not be downloaded") as info:
        build_backbone("resnet18", weights="imagenet")
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg and "--weights" in msg and "start from scratch" in msg


def test_weights_are_loaded(monkeypatch):
    torch.manual_seed(4)
    ref = torchvision.models.resnet18().state_dict()
    urls = []

    def fake_download(url, **kwargs):
        urls.append(url)
        return ref

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    b = build_backbone("resnet18", stem="imagenet", weights="imagenet")
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert torch.equal(b.conv1.weight, ref["conv1.weight"])
    assert torch.equal(b.layer4[1].bn2.running_var, ref["layer4.1.bn2.running_var"])


def test_classifier_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = Classifier(build_backbone("resnet18", stem="imagenet"), num_outputs=3)
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2])
    assert model(x).shape == (6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


class TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out_features = 4
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_multihead_routes_to_the_right_head():
    torch.manual_seed(0)
    ids = {"chestmnist": 14, "chestmnist:effusion": 1, "organmnist3d": 11, "a.b": 2, "a_b": 3}
    model = MultiHeadModel(TinyBackbone(), ids)
    assert model.task_ids == list(ids)
    x = torch.rand(5, 2, 3, 3)
    feats = model.backbone(x)
    for task_id, n in ids.items():
        out = model(x, task_id)
        assert out.shape == (5, n)
        assert torch.allclose(out, model.head(task_id)(feats))
    # a loss on one task reaches only that task's head (and the shared backbone)
    model(x, "a.b").sum().backward()
    for task_id in ids:
        grad = model.head(task_id).weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (task_id == "a.b")
    assert model.backbone.net[1].weight.grad is not None
    with pytest.raises(KeyError, match="pathmnist"):
        model(x, "pathmnist")
    with pytest.raises(ValueError, match="already"):
        model.add_head("a.b", 2)
    added = model.add_head("pathmnist", 9)
    assert model(x, "pathmnist").shape == (5, 9) and model.head("pathmnist") is added


def test_multihead_keys_are_safe_and_reversible():
    for task_id in ["chestmnist:effusion", "a.b", "a_b", "a_p", "a__.:_c", "x"]:
        key = head_key(task_id)
        assert "." not in key and ":" not in key
        assert task_id_of(key) == task_id
    assert len({head_key(t) for t in ["a.b", "a_b", "a_pb", "a:b", "a_cb"]}) == 5
    model = MultiHeadModel(build_backbone("resnet18", stem="imagenet"), {"chestmnist:effusion": 1})
    assert model(torch.rand(2, 1, 28, 28), "chestmnist:effusion").shape == (2, 1)
    # the state dict reloads into a model built with the same heads
    clone = MultiHeadModel(build_backbone("resnet18", stem="imagenet"), {"chestmnist:effusion": 1})
    clone.load_state_dict(model.state_dict())


def test_num_parameters():
    assert num_parameters(nn.Linear(3, 2)) == 8
    assert num_parameters(shared_backbone("resnet18")) == 11_176_512 - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64


@pytest.mark.parametrize("conv3d", ["3d", "2.5d", "acs"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_3d_convolution_kinds(conv3d: str, arch: str) -> None:
    from medmeta.learning.models import ACSConv3d, SmallMapConv3d

    torch.manual_seed(0)
    net = build_backbone(arch, dims=3, stem="imagenet", conv3d=conv3d)
    out = net(torch.rand(2, 1, 28, 28, 28))
    assert out.shape == (2, 512 if arch == "resnet18" else 2048) and torch.isfinite(out).all()
    kernels = {tuple(m.weight.shape[2:]) for m in net.modules() if isinstance(m, (SmallMapConv3d, ACSConv3d))}
    expected = {"3d": {(7, 7, 7), (3, 3, 3), (1, 1, 1)}, "2.5d": {(1, 7, 7), (1, 3, 3), (1, 1, 1)},
                "acs": {(7, 7), (3, 3), (1, 1, 1)}}[conv3d]
    assert kernels == expected
    # A 2D-shaped ACS weight loads a 2D state dict's conv weights unchanged (ACS's point).
    if conv3d == "acs":
        reference = getattr(torchvision.models, arch)()
        assert net.layer1[0].conv2.weight.shape == reference.layer1[0].conv2.weight.shape


def test_acs_convolution_hand_case() -> None:
    """An impulse through a 3-output ACS conv: output 0 is the kernel in the axial plane, 1 in the
    coronal, 2 in the sagittal (cross-correlation: flipped), and zero off those planes."""
    from medmeta.learning.models import ACSConv3d

    conv = ACSConv3d(1, 3, 3, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(27.0).view(3, 1, 3, 3))
    x = torch.zeros(1, 1, 3, 3, 3)
    x[0, 0, 1, 1, 1] = 1.0
    y = conv(x)[0]
    k = conv.weight[:, 0].detach().flip(1).flip(2)
    assert torch.equal(y[0, 1], k[0]) and not y[0, 0].any() and not y[0, 2].any()
    assert torch.equal(y[1, :, 1, :], k[1]) and not y[1, :, 0, :].any()
    assert torch.equal(y[2, :, :, 1], k[2]) and not y[2, :, :, 2].any()


@pytest.mark.parametrize("shape", [(512, 512, 3, 1, 1, 1), (256, 512, 3, 2, 1, 2), (256, 512, 1, 2, 0, 2),
                                   (256, 256, 3, 1, 1, 2), (512, 512, 3, 1, 1, 4)])
def test_small_map_convolutions_equal_the_plain_ones(shape) -> None:
    from medmeta.learning.models import SmallMapConv2d, SmallMapConv3d

    c, o, k, stride, pad, size = shape
    torch.manual_seed(0)
    for cls, fn, dims in ((SmallMapConv2d, torch.nn.functional.conv2d, 2), (SmallMapConv3d, torch.nn.functional.conv3d, 3)):
        conv = cls(c, o, k, stride, pad, bias=True)
        x = torch.randn(3, c, *(size,) * dims, requires_grad=True)
        ref = fn(x, conv.weight, conv.bias, stride, pad)
        out = conv(x)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        for a, b in zip(torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias)),
                        torch.autograd.grad(ref.square().sum(), (x, conv.weight, conv.bias))):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
