"""Backbones and heads: ResNets that turn images into feature vectors, plus linear heads.

``build_backbone`` returns a ResNet without its classifier, mapping a batch of images in
[0, 1] to features ``(B, out_features)``:

* 2D: torchvision ResNet-18/50. Grey images are expanded to 3 channels and every input
  is normalised with the ImageNet mean/std inside ``forward``, so callers always pass
  [0, 1] images and ImageNet weights see the input statistics they were trained on.
  The normalisation is applied whatever the weights, so a backbone behaves the same
  after its state dict is saved and reloaded.
* 3D: a ResNet-18 with 3D convolutions (MedMNIST 3D volumes are grey: 1 input
  channel, no normalisation).

The stem is a choice because at 28px the ImageNet stem (7x7 stride-2 conv + max-pool)
shrinks the image to 7x7 before the first block; the CIFAR stem (3x3 stride-1 conv,
no max-pool) keeps 28x28. The 2D backbone is a subclass of torchvision's ``ResNet``
with ``fc`` replaced by ``nn.Identity``, so its state dict uses torchvision's keys.

``Classifier`` is a backbone plus one linear head; ``MultiHeadModel`` shares a backbone
between tasks, one linear head per task id.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.error import URLError

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import ResNet18_Weights, ResNet50_Weights
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ..errors import ConfigError, MethodError
from ..settings import Settings

ARCHS_2D = ("resnet18", "resnet50")
ARCHS_3D = ("resnet18",)
STEMS = ("cifar", "imagenet")


@dataclass
class ModelConfig(Settings):
    """The backbone every method of an experiment uses."""

    arch: Literal["resnet18", "resnet50"] = "resnet18"
    """2D architecture; 3D targets always use the 3D ResNet-18."""
    stem: Literal["imagenet", "cifar"] = "imagenet"
    """``imagenet``: 7x7 stride-2 conv + max-pool; ``cifar``: 3x3 stride-1 conv, no pool (see the module docstring)."""
    imagenet_weights: str | None = None
    """A local torchvision ImageNet state dict for the ``imagenet`` initialisation; None downloads it."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESNET_2D = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}
_IMAGENET_WEIGHTS = {"resnet18": ResNet18_Weights.IMAGENET1K_V1, "resnet50": ResNet50_Weights.IMAGENET1K_V2}

WeightsArg = str | os.PathLike | None


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes convolutions over small maps as one matrix product on the CPU.

    At 28px a ResNet's deep layers see 4x4, 2x2 and 1x1 maps with 256-512 channels, where
    oneDNN's convolution (above all its backward pass) runs far below the machine's speed: a
    3x3 conv on a 1x1 map takes 25 ms forward+backward for 25 images, the same product as
    unfold + matmul takes 14 ms (benchmarks/adaptation.py). When ``in_channels >= 32 * H * W``
    on the CPU this layer unfolds the input (im2col) and multiplies by the weight instead; the
    result is the same convolution up to float rounding, its gradients come from autograd, and
    the parameters and state dict are those of ``nn.Conv2d``. Elsewhere (large maps, CUDA) it
    is ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if x.device.type != "cpu" or self.groups != 1 or self.padding_mode != "zeros" or self.in_channels < 32 * h * w:
            return super().forward(x)
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C*kh*kw, oh*ow)
        out = self.weight.reshape(self.out_channels, -1) @ cols
        if self.bias is not None:
            out = out + self.bias.view(-1, 1)
        return out.view(x.shape[0], self.out_channels, oh, ow)


def use_small_map_convs(model: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Conv2d`` of ``model`` into a ``SmallMapConv2d`` (same parameters)."""
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = SmallMapConv2d
    return model


class ResNet2d(ResNet):
    """torchvision ResNet returning pooled features; expands grey input and normalises it.

    Input: float images in [0, 1] shaped (B, 1, H, W) or (B, 3, H, W).
    Output: features (B, out_features).
    """

    def __init__(self, arch: str = "resnet18", stem: str = "cifar") -> None:
        block, layers = _RESNET_2D[arch]
        super().__init__(block, layers)
        self.arch = arch
        self.stem = stem
        self.out_features: int = self.fc.in_features
        self.fc = nn.Identity()
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
        use_small_map_convs(self)
        # Non-persistent: the state dict keeps exactly torchvision's keys.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"2D backbone expects (B, 1 or 3, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        return super().forward(x)


class BasicBlock3d(nn.Module):
    """ResNet basic block with 3x3x3 convolutions (two conv-BN layers plus a shortcut)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm3d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet3d(nn.Module):
    """3D ResNet-18 (layers [2, 2, 2, 2], widths 64/128/256/512) for grey volumes.

    Input: float volumes in [0, 1] shaped (B, 1, D, H, W). Output: features (B, 512).
    The cifar stem runs layer1 at full resolution: fine at 28^3, costly at 64^3.
    Module names follow torchvision's ResNet (conv1, bn1, layer1..4).
    """

    def __init__(self, stem: str = "cifar") -> None:
        super().__init__()
        self.arch = "resnet18"
        self.stem = stem
        if stem == "cifar":
            self.conv1 = nn.Conv3d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv3d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        widths, strides = (64, 128, 256, 512), (1, 2, 2, 2)
        in_planes = 64
        for i, (width, stride) in enumerate(zip(widths, strides), start=1):
            layer = nn.Sequential(BasicBlock3d(in_planes, width, stride), BasicBlock3d(width, width, 1))
            setattr(self, f"layer{i}", layer)
            in_planes = width
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.out_features: int = 512
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"3D backbone expects (B, 1, D, H, W) volumes, got shape {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_backbone(
    arch: str = "resnet18", dims: int = 2, stem: str = "cifar", weights: WeightsArg = None
) -> nn.Module:
    """A ResNet feature extractor: (B, C, H, W) or (B, 1, D, H, W) in [0, 1] -> (B, out_features).

    arch: "resnet18" or "resnet50" (2D); "resnet18" only for 3D.
    dims: 2 or 3.
    stem: "cifar" (3x3 stride-1 conv, no max-pool; for 28px) or "imagenet" (7x7 stride-2 conv
        + max-pool; for 128-224px).
    weights: None (random init), "imagenet" (torchvision ImageNet weights, downloaded into the
        torch hub cache; 2D only), or the path of a saved state dict with torchvision ResNet
        keys (a torchvision checkpoint such as ``resnet18-f37072fd.pth``, or the
        ``state_dict()`` of a backbone built here; a 3D backbone takes only its own).
        ``fc.*`` entries are ignored. With the cifar stem a 7x7 ``conv1.weight`` does not fit
        the 3x3 conv: every weight except conv1 is loaded and conv1 keeps its random init.
    """
    if dims not in (2, 3):
        raise ConfigError(f"dims must be 2 or 3, got {dims!r}")
    if stem not in STEMS:
        raise ConfigError(f"stem must be one of {STEMS}, got {stem!r}")
    archs = ARCHS_2D if dims == 2 else ARCHS_3D
    if arch not in archs:
        raise ConfigError(f"arch for dims={dims} must be one of {archs}, got {arch!r}")
    imagenet = isinstance(weights, str) and weights == "imagenet"
    if imagenet and dims == 3:
        raise MethodError("there are no ImageNet weights for 3D backbones; use weights=None or a local file")

    model: nn.Module = ResNet2d(arch, stem) if dims == 2 else ResNet3d(stem)
    if weights is None:
        return model
    if imagenet:
        _load_into(model, _download_imagenet(arch), source="ImageNet weights")
    else:
        _load_into(model, _read_state_dict(weights), source=f"weights file {os.fspath(weights)!r}")
    return model


def _download_imagenet(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict for ``arch`` (hub cache, else download)."""
    url = _IMAGENET_WEIGHTS[arch].url
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)
    except (URLError, OSError, RuntimeError) as err:
        file_name = url.rsplit("/", 1)[-1]
        raise MethodError(
            f"ImageNet weights for {arch} could not be downloaded from {url} ({err}). "
            f"Pass a local weights file instead, e.g. weights='/path/{file_name}' "
            f"(--weights /path/{file_name} on the command line), put that file in "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}, or use weights=None."
        ) from err


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict (mapping of names to tensors) from ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"weights file {str(path)!r} not found (weights must be None, 'imagenet' or a .pth state-dict path)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and format errors all mean "not a state dict"
        raise ConfigError(f"weights file {str(path)!r} could not be read as a torch state dict: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly, except fc.* and (cifar stem) a non-fitting conv1."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    skipped = set()
    conv1 = state.get("conv1.weight")
    if model.stem == "cifar" and conv1 is not None and conv1.shape != own["conv1.weight"].shape:
        del state["conv1.weight"]
        skipped.add("conv1.weight")
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state) - skipped)
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        raise ConfigError(
            f"{source} do not fit a {model.arch} {type(model).__name__} with the {model.stem} stem: "
            f"shape mismatches {mismatched[:5]}, missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False)


class Classifier(nn.Module):
    """A backbone followed by one linear head: images -> logits (B, num_outputs)."""

    def __init__(self, backbone: nn.Module, num_outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_features, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def head_key(task_id: str) -> str:
    """A ModuleDict-safe key for a task id ('.' is not allowed in module names).

    Escapes '_' as '__', '.' as '_p' and ':' as '_c', so distinct task ids never collide
    and ``task_id_of`` recovers the id.
    """
    return task_id.replace("_", "__").replace(".", "_p").replace(":", "_c")


def task_id_of(key: str) -> str:
    """The task id whose ``head_key`` is ``key``."""
    out, chars = [], iter(key)
    for ch in chars:
        out.append({"_": "_", "p": ".", "c": ":"}[next(chars)] if ch == "_" else ch)
    return "".join(out)


class MultiHeadModel(nn.Module):
    """A shared backbone with one linear head per task id; ``forward(x, task_id)`` -> logits.

    Heads live in ``self.heads`` (an ``nn.ModuleDict``) under ``head_key(task_id)``.
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, int] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict()
        for task_id, num_outputs in (heads or {}).items():
            self.add_head(task_id, num_outputs)

    @property
    def task_ids(self) -> list[str]:
        """Task ids with a head, in the order they were added."""
        return [task_id_of(key) for key in self.heads]

    def add_head(self, task_id: str, num_outputs: int) -> nn.Linear:
        """Add a fresh linear head for ``task_id``, on the backbone's device and dtype."""
        key = head_key(task_id)
        if key in self.heads:
            raise ValueError(f"a head for task {task_id!r} already exists")
        ref = next(self.backbone.parameters(), None)
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        head = nn.Linear(self.backbone.out_features, num_outputs, **factory)
        self.heads[key] = head
        return head

    def head(self, task_id: str) -> nn.Linear:
        """The head of ``task_id``; KeyError naming the known ids if there is none."""
        key = head_key(task_id)
        if key not in self.heads:
            raise KeyError(f"no head for task {task_id!r}; known tasks: {self.task_ids}")
        return self.heads[key]

    def forward(self, x: torch.Tensor, task_id: str) -> torch.Tensor:
        return self.head(task_id)(self.backbone(x))


def num_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) in ``module``."""
    return sum(p.numel() for p in module.parameters())


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_batchnorm(module: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Replace every BatchNorm layer's running statistics by those of ``batches``; weights unchanged.

    The statistics are the cumulative average over the batches (momentum ``None`` while
    estimating, restored after), so they belong to the data given and nothing else. Used where a
    backbone trained on other data is evaluated in eval mode on one task: mm-PT validation (per
    source task) and the frozen-feature adaptation rules (on the episode's support set).
    """
    layers = _batchnorms(module)
    momenta = [m.momentum for m in layers]
    modes = {m: m.training for m in module.modules()}
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        module.train()
        for x in batches:
            module(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for m, was in modes.items():
            m.training = was


@contextmanager
def batchnorm_restored(module: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm layer's running statistics after the block."""
    layers = _batchnorms(module)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(layers, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
