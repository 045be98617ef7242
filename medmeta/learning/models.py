"""Backbones and heads: ResNets that turn images into feature vectors, plus linear heads.

``build_backbone`` is the one registry of backbones: medmeta's ResNets (below), torchvision's
AlexNet and every timm architecture (``backbones``). Each maps a batch of images in [0, 1] to
features ``(B, out_features)``. medmeta's ResNets:

* 2D: torchvision ResNet-18/50. Grey images are expanded to 3 channels and every input
  is normalised with the ImageNet mean/std inside ``forward``, so callers always pass
  [0, 1] images and ImageNet weights see the input statistics they were trained on.
  The normalisation is applied whatever the weights, so a backbone behaves the same
  after its state dict is saved and reloaded.
* 3D: torchvision's ResNet-18/50 turned 3D layer by layer (``ResNet3d``) with 3D, 2.5D or
  ACS convolutions (MedMNIST 3D volumes are grey: 1 input channel, no normalisation).

On the CPU, convolutions over small maps (the deep layers at 28px) run as one matrix product
(``SmallMapConv2d``, ``SmallMapConv3d``): the same convolution up to float rounding, about
1.8x faster to fine-tune at 28px than oneDNN's kernels (benchmarks/adaptation.py).

The stem is a choice because at 28px the ImageNet stem (7x7 stride-2 conv + max-pool)
shrinks the image to 7x7 before the first block; the CIFAR stem (3x3 stride-1 conv,
no max-pool) keeps 28x28. The backbones subclass torchvision's ``ResNet`` with ``fc``
replaced by ``nn.Identity``, so their state dicts use torchvision's keys.

``Classifier`` is a backbone plus one linear head; ``MultiHeadModel`` shares a backbone
between tasks, one linear head per task id.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import ResNet18_Weights, ResNet50_Weights
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError, MethodError
from ..settings import Settings, setting
from .backbones import (PRETRAINED, ImageAdapter, InputMode, build_pretrained_2d, check_arch, download,
                        load_checked, read_weights)

Arch = Literal["resnet18", "resnet50"]
"""medmeta's own ResNets; ``model.arch`` also takes torchvision's alexnet and any timm name (``backbones``)."""
Stem = Literal["imagenet", "cifar"]
Conv3dKind = Literal["3d", "2.5d", "acs"]
ARCHS, STEMS, CONV3D_KINDS = get_args(Arch), get_args(Stem), get_args(Conv3dKind)


@dataclass
class ModelConfig(Settings):
    """The backbone every method of an experiment uses."""

    arch: str = "resnet18"
    """resnet18 or resnet50 (medmeta's, 2D and 3D), alexnet (torchvision's) or any timm model name
    with its weight tag (``vit_base_patch16_224.dino``) or ``hf-hub:owner/name`` (2D only)."""
    stem: Stem = "imagenet"
    """medmeta's ResNets: ``imagenet``: 7x7 stride-2 conv + max-pool; ``cifar``: 3x3 stride-1 conv, no pool."""
    input: InputMode = "auto"
    """How images reach the model's input size: pad (zeros after normalisation), resize, native;
    auto: native for medmeta's ResNets, pad for the others (see ``backbones``)."""
    canvas: int | None = setting(None, min=1)
    """The side images are padded or resized to (needs ``input`` pad or resize); None: the
    architecture's own input size (timm's pretrained config; 224 for AlexNet and medmeta's
    ResNets). MedMNIST+ pads every backbone to 224."""
    weights: str | None = None
    """A local weights file for the pretrained initialisation; None: the published weights (downloaded)."""
    conv3d: Conv3dKind = "3d"
    """Convolutions of 3D backbones: 3D, 2.5D (2D on slices) or ACS (see ``ResNet3d``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_arch(self.arch)
        if self.canvas is not None and self.input not in ("pad", "resize"):
            raise ConfigError(f"config key model.canvas: a canvas of {self.canvas} needs model.input pad or resize "
                              f"(it is {self.input})")


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
        (ph, pw), (kh, kw) = self.padding, self.kernel_size
        if (oh, ow) == (1, 1) and self.dilation == (1, 1) and kh - 1 - ph >= h - 1 and kw - 1 - pw >= w - 1:
            # One output pixel whose window holds the whole input: the taps over padding multiply
            # zeros, so the convolution is a linear layer on the taps over the input.
            weight = self.weight[:, :, ph:ph + h, pw:pw + w].reshape(self.out_channels, -1)
            return F.linear(x.reshape(x.shape[0], -1), weight, self.bias).view(x.shape[0], -1, 1, 1)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C*kh*kw, oh*ow)
        out = self.weight.reshape(self.out_channels, -1) @ cols
        if self.bias is not None:
            out = out + self.bias.view(-1, 1)
        return out.view(x.shape[0], self.out_channels, oh, ow)


def small_map_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stride: tuple[int, int, int], padding: tuple[int, int, int]) -> torch.Tensor:
    """A 3D convolution (no dilation, one group) as a matrix product: im2col with ``Tensor.unfold``.

    A single output voxel whose window holds the whole input is a linear layer on the taps over
    the input (the taps over padding multiply zeros).
    """
    k = weight.shape[2:]
    dhw = x.shape[2:]
    out_size = [(n + 2 * pi - ki) // si + 1 for n, pi, ki, si in zip(dhw, padding, k, stride)]
    n, c = x.shape[:2]
    if out_size == [1, 1, 1] and all(ki - 1 - pi >= m - 1 for m, pi, ki in zip(dhw, padding, k)):
        taps = weight[:, :, padding[0]:padding[0] + dhw[0], padding[1]:padding[1] + dhw[1],
                      padding[2]:padding[2] + dhw[2]]
        return F.linear(x.reshape(n, -1), taps.reshape(weight.shape[0], -1), bias).view(n, -1, 1, 1, 1)
    padded = F.pad(x, (padding[2], padding[2], padding[1], padding[1], padding[0], padding[0]))
    windows = padded.unfold(2, k[0], stride[0]).unfold(3, k[1], stride[1]).unfold(4, k[2], stride[2])
    cols = windows.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(n, c * k[0] * k[1] * k[2], -1)
    out = weight.reshape(weight.shape[0], -1) @ cols
    if bias is not None:
        out = out + bias.view(-1, 1)
    return out.view(n, weight.shape[0], *out_size)


def _small(x: torch.Tensor, in_channels: int) -> bool:
    """Whether a map is small enough for the matrix-product path: CPU, ``in_channels >= 32 * voxels``."""
    return x.device.type == "cpu" and in_channels >= 32 * math.prod(x.shape[2:])


class SmallMapConv3d(nn.Conv3d):
    """``nn.Conv3d`` that computes convolutions over small volumes as one matrix product on the CPU.

    The 3D twin of ``SmallMapConv2d``: at 28^3 a 3D ResNet-18's last layers see 2^3 and 1^3
    maps with 256-512 channels, where oneDNN's backward pass takes 74 ms per 3x3x3 conv on a
    1^3 map for 10 volumes (``small_map_conv3d`` instead).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups != 1 or self.padding_mode != "zeros" or self.dilation != (1, 1, 1) or not _small(x, self.in_channels):
            return super().forward(x)
        return small_map_conv3d(x, self.weight, self.bias, self.stride, self.padding)


class ACSConv3d(nn.Module):
    """ACS convolution (Yang et al., IEEE JBHI 2021): a 2D kernel applied to a volume in three views.

    The output channels are split in three near-equal groups; the first group's (k, k) kernels
    convolve axial planes (kernel (1, k, k)), the second coronal (k, 1, k), the third sagittal
    (k, k, 1). The weight keeps the 2D shape (out, in, k, k), so 2D weights load unchanged.
    "Same" padding (p = (k - 1) / 2) keeps the three views' outputs the same shape.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = False) -> None:
        super().__init__()
        if 2 * padding != kernel_size - 1:
            raise ValueError(f"ACS convolution needs 'same' padding (k - 1) / 2; got k={kernel_size}, p={padding}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        third = out_channels // 3
        self.split = (out_channels - 2 * third, third, third) if out_channels % 3 != 2 else (third + 1, third + 1, third)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, s = self.padding, (self.stride,) * 3
        a, c, _ = self.split
        views = ((self.weight[:a].unsqueeze(2), (0, p, p)), (self.weight[a:a + c].unsqueeze(3), (p, 0, p)),
                 (self.weight[a + c:].unsqueeze(4), (p, p, 0)))
        small = _small(x, self.in_channels)
        out = torch.cat([small_map_conv3d(x, w, None, s, pad) if small else F.conv3d(x, w, None, s, pad)
                         for w, pad in views if len(w)], dim=1)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1, 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, split={self.split}")


def use_small_map_convs(model: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Conv2d``/``nn.Conv3d`` of ``model`` into its small-map twin (same parameters)."""
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = SmallMapConv2d
        elif type(m) is nn.Conv3d:
            m.__class__ = SmallMapConv3d
    return model


class ResNet2d(ResNet):
    """torchvision ResNet returning pooled features; expands grey input and normalises it.

    Input: float images in [0, 1] shaped (B, 1, H, W) or (B, 3, H, W).
    Output: features (B, out_features).
    """

    def __init__(self, arch: Arch, stem: Stem, mode: InputMode = "auto", canvas: int | None = None) -> None:
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
        # Its buffers are non-persistent: the state dict keeps exactly torchvision's keys.
        self.adapter = ImageAdapter(IMAGENET_MEAN, IMAGENET_STD, (canvas or 224,) * 2, "native" if mode == "auto" else mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.adapter(x))


def _to_3d(module: nn.Module, kind: Conv3dKind) -> nn.Module:
    """The 3D counterpart of one 2D layer of a torchvision ResNet (MedMNIST v2's 3D baselines)."""
    if isinstance(module, nn.Conv2d):
        (k, _), (s, _), (p, _) = module.kernel_size, module.stride, module.padding
        bias = module.bias is not None
        if kind == "acs" and k > 1:
            return ACSConv3d(module.in_channels, module.out_channels, k, s, p, bias)
        if kind == "2.5d" or (kind == "acs" and k == 1):
            conv = SmallMapConv3d(module.in_channels, module.out_channels, (1, k, k), s, (0, p, p), bias=bias)
        else:
            conv = SmallMapConv3d(module.in_channels, module.out_channels, k, s, p, bias=bias)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        return conv
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm3d(module.num_features)
    if isinstance(module, nn.MaxPool2d):
        return nn.MaxPool3d(module.kernel_size, module.stride, module.padding)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return nn.AdaptiveAvgPool3d(1)
    return module


class ResNet3d(ResNet):
    """A torchvision ResNet-18/50 turned 3D layer by layer, for grey volumes.

    ``conv``: ``3d`` (k x k x k convolutions), ``2.5d`` (1 x k x k: 2D convolutions on the
    slices, as ACSConv's Conv2_5d) or ``acs`` (ACS convolutions, see ``ACSConv3d``); strides
    apply to every axis and pools are 3D, as in MedMNIST v2's 3D baselines. Input: float
    volumes in [0, 1] shaped (B, 1, D, H, W), no normalisation. Output: features (B, out_features).
    Module and state-dict names follow torchvision's ResNet.
    """

    def __init__(self, arch: Arch, stem: Stem, conv: Conv3dKind) -> None:
        block, layers = _RESNET_2D[arch]
        super().__init__(block, layers)
        self.arch, self.stem, self.conv = arch, stem, conv
        self.out_features: int = self.fc.in_features
        self.fc = nn.Identity()
        self.conv1 = (nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False) if stem == "cifar"
                      else nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False))
        if stem == "cifar":
            self.maxpool = nn.Identity()
        for parent in list(self.modules()):
            for name, child in parent.named_children():
                converted = _to_3d(child, conv)
                if converted is not child:
                    setattr(parent, name, converted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"3D backbone expects (B, 1, D, H, W) volumes, got shape {tuple(x.shape)}")
        return super().forward(x)


def build_backbone(
    arch: str = ModelConfig.arch, dims: int = 2, stem: Stem = ModelConfig.stem, weights: WeightsArg = None,
    conv3d: Conv3dKind = ModelConfig.conv3d, input: InputMode = ModelConfig.input,
    canvas: int | None = ModelConfig.canvas
) -> nn.Module:
    """The one backbone registry: (B, C, H, W) or (B, 1, D, H, W) in [0, 1] -> (B, out_features).

    arch: "resnet18" or "resnet50" (medmeta's ResNets, 2D or 3D), "alexnet" (torchvision's) or a
        timm model name (2D only; see ``backbones``).
    dims: 2 or 3.
    conv3d: for 3D, "3d", "2.5d" or "acs" convolutions (see ``ResNet3d``).
    stem: medmeta's ResNets: "cifar" (3x3 stride-1 conv, no max-pool; for 28px) or "imagenet"
        (7x7 stride-2 conv + max-pool; for 128-224px).
    weights: None (random init), "pretrained" (the architecture's published weights, downloaded
        by timm or torchvision into their caches; "imagenet" is the same for medmeta's ResNets;
        2D only), or the path of a state dict. For medmeta's ResNets: torchvision ResNet keys
        (``resnet18-f37072fd.pth``, or the ``state_dict()`` of a backbone built here; a 3D
        backbone takes only its own); ``fc.*`` entries are ignored; with the cifar stem a 7x7
        ``conv1.weight`` does not fit the 3x3 conv: every weight except conv1 is loaded.
    input: how images reach the model's input size (``backbones.ImageAdapter``).
    canvas: that input size, if not the architecture's own (2D only).
    """
    if dims not in (2, 3):
        raise ConfigError(f"dims must be 2 or 3, got {dims!r}")
    if stem not in STEMS:
        raise ConfigError(f"stem must be one of {STEMS}, got {stem!r}")
    check_arch(arch)
    published = isinstance(weights, str) and weights in (PRETRAINED, "imagenet")
    if published and dims == 3:
        raise MethodError("there are no published weights for 3D backbones; start from scratch or a local file")
    if arch not in ARCHS:
        if dims == 3:
            raise MethodError(f"{arch} is a 2D architecture; 3D targets take resnet18 or resnet50 (2.5D, 3D or ACS "
                              "convolutions: model.conv3d)")
        return build_pretrained_2d(arch, PRETRAINED if published else weights, input, canvas)
    if conv3d not in CONV3D_KINDS:
        raise ConfigError(f"conv3d must be one of {CONV3D_KINDS}, got {conv3d!r}")
    model: nn.Module = ResNet2d(arch, stem, input, canvas) if dims == 2 else ResNet3d(arch, stem, conv3d)
    if weights is None:
        return model
    if published:
        _load_into(model, download(_IMAGENET_WEIGHTS[arch].url, arch), source="ImageNet weights")
    else:
        _load_into(model, read_weights(weights), source=f"weights file {os.fspath(weights)!r}")
    return model


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load torchvision ResNet keys into medmeta's ResNet, checked key by key (``load_checked``);
    ``fc.*`` is dropped, and with the cifar stem a 7x7 ``conv1`` that does not fit stays random."""
    conv1 = state.get("conv1.weight")
    keep = (("conv1.weight",) if model.stem == "cifar" and conv1 is not None
            and conv1.shape != model.conv1.weight.shape else ())
    load_checked(model, state, source, f"a {model.arch} {type(model).__name__} with the {model.stem} stem",
                 ignore=("fc",), keep=keep)


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


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` has BatchNorm layers with running statistics (a ViT's LayerNorms have none)."""
    return bool(_batchnorms(module))


@contextmanager
def train_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Put ``module`` (every submodule) in train or eval mode for a block, then restore each one's mode."""
    modes = {m: m.training for m in module.modules()}
    module.train(training)
    try:
        yield
    finally:
        for m, was in modes.items():
            m.training = was


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
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        with train_mode(module, True):
            for x in batches:
                module(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum


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


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer of ``module`` (on its device), for ``changed_state``."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_state(module: nn.Module, snapshot: dict[str, torch.Tensor]) -> list[str]:
    """Names of the parameters and buffers of ``module`` that differ from ``snapshot`` bit for bit
    (NaN included), in shape, dtype or device, or that were added or removed."""
    state = {k: v.detach() for k, v in module.state_dict().items()}

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(_SAME_SIZE_INT[t.element_size()]) if t.is_floating_point() else t

    changed = [k for k in state.keys() & snapshot.keys()
               if state[k].shape != snapshot[k].shape or state[k].dtype != snapshot[k].dtype
               or state[k].device != snapshot[k].device or not torch.equal(bits(state[k]), bits(snapshot[k]))]
    return sorted(changed + list(state.keys() ^ snapshot.keys()))
