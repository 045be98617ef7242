"""Backbones beyond medmeta's ResNets: every ``timm`` architecture, torchvision's AlexNet, and
the weights files they load.

``models.build_backbone`` is the one registry: ``resnet18``/``resnet50`` are medmeta's own
ResNets (2D and 3D, with their stems); ``alexnet`` is torchvision's (timm has none; MedMNIST+
replaces its last classifier layer, here by the identity: 4096 features); any other name is a
``timm`` model, with its weight tag (``vit_base_patch16_224.dino``) or from the Hugging Face
hub (``hf-hub:owner/name``). Each maps images in [0, 1] to features ``(B, out_features)`` with
the normalisation its weights expect (timm's pretrained config: mean, std, input size), grey
images expanded to three channels, so heads, mm-PT, MAML, the rules and the supervised schemes
use any of them alike.

``input`` says how images smaller than the model's input size get there: ``pad`` (normalise,
then centre in a zero canvas: MedMNIST+'s recipe), ``resize`` (bilinear), or ``native`` (as
they are, where the architecture accepts the size). ``auto`` pads for timm and torchvision
models and keeps medmeta's ResNets native (they take any size). The input size is the weights'
own (timm's pretrained config; 224 for AlexNet and medmeta's ResNets) unless ``canvas`` names
another: MedMNIST+ pads every model's input to 224, EfficientNet-B4 (320) and SAM (1024) too.

Weights: ``"pretrained"`` asks timm or torchvision for the published weights (their own
download and cache); a path reads a local file (timm or torchvision state dict, ``.pth`` or
``.safetensors``, or a medmeta backbone's own ``state_dict``), checked key by key: a file of
another architecture is refused in one line naming the first mismatched key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError, MethodError

InputMode = Literal["auto", "pad", "resize", "native"]
Start = Literal["scratch", "pretrained"]
"""Where a trained backbone starts (supervised training, mm-PT, MAML): random, or published weights."""
OWN_RESNETS = ("resnet18", "resnet50")
TORCHVISION = ("alexnet",)
PRETRAINED = "pretrained"
"""The ``weights`` value that asks for an architecture's published weights."""


def start_weights(start: Start, weights: str | None) -> str | None:
    """The ``weights`` argument of ``models.build_backbone`` for a backbone that starts at ``start``:
    None (random), the local file ``weights``, or the published ones."""
    return (weights or PRETRAINED) if start == "pretrained" else None


def check_arch(arch: str) -> str:
    """``arch`` if medmeta can build it, else one ConfigError line saying what it takes."""
    if arch in OWN_RESNETS or arch in TORCHVISION or arch.startswith("hf-hub:"):
        return arch
    import timm

    if timm.is_model(arch):
        if "." in arch and arch not in timm.list_pretrained(arch):
            tags = timm.list_pretrained(arch.split(".")[0] + ".*")
            raise ConfigError(f"config key model.arch: {arch.split('.')[0]} has no weight tag {arch.split('.', 1)[1]!r}; "
                              f"timm has {', '.join(tags[:8]) or 'none'}" + (" ..." if len(tags) > 8 else ""))
        return arch
    close = timm.list_models(f"*{arch.split('.')[0][:12]}*")[:5]
    raise ConfigError(f"config key model.arch: unknown architecture {arch!r}; give resnet18 or resnet50 (medmeta's), "
                      f"alexnet (torchvision's) or a timm model name with its weight tag"
                      + (f" (close: {', '.join(close)})" if close else "") + ", or hf-hub:owner/name")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict (names to tensors) from a ``.safetensors`` or torch file; one line if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {str(path)!r} not found (give 'pretrained' or the path of a state dict)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, safetensors and format errors all mean "not a state dict"
        raise ConfigError(f"weights file {str(path)!r} could not be read as a state dict: "
                          f"{' '.join(str(err).split())}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint around its model
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    return state


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str,
                 ignore: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``: every key present with its shape, nothing else (keys under
    ``ignore``, e.g. a classifier the backbone does not have, are dropped; the module's keys in
    ``keep`` stay as they are); else one line naming ``source`` and the first key that does not fit."""
    def under(key: str, prefixes: tuple[str, ...]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    state = {k: v for k, v in state.items() if not under(k, ignore + keep)}
    own = {k: v for k, v in module.state_dict().items() if not under(k, keep)}
    for key, value in state.items():
        if key not in own:
            raise ConfigError(f"{source} does not fit {arch}: unexpected key {key!r} (a file of another architecture?)")
        if value.shape != own[key].shape:
            raise ConfigError(f"{source} does not fit {arch}: key {key!r} has shape {tuple(value.shape)}, "
                              f"{arch} needs {tuple(own[key].shape)}")
    missing = [k for k in own if k not in state]
    if missing:
        raise ConfigError(f"{source} does not fit {arch}: missing key {missing[0]!r} ({len(missing)} missing)")
    module.load_state_dict(state, strict=not keep)


class ImageAdapter(nn.Module):
    """Images in [0, 1] (B, 1 or 3, H, W) to what a pretrained 2D model expects: three channels,
    normalised with ``mean``/``std``, then padded with zeros or resized to ``size`` (or not: native)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: tuple[int, int], mode: InputMode) -> None:
        super().__init__()
        self.size, self.mode = size, mode
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"2D backbone expects (B, 1 or 3, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        (h, w), (th, tw) = x.shape[-2:], self.size
        if self.mode == "native" or (h, w) == (th, tw):
            return x
        if self.mode == "resize" or h > th or w > tw:
            return F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
        top, left = (th - h) // 2, (tw - w) // 2
        return F.pad(x, (left, tw - w - left, top, th - h - top))


class TimmBackbone(nn.Module):
    """A timm model without its classifier (``num_classes=0``) behind an ``ImageAdapter`` built
    from its pretrained config. State-dict keys are timm's under ``model.``."""

    def __init__(self, arch: str, pretrained: bool, mode: InputMode, canvas: int | None = None) -> None:
        super().__init__()
        import timm

        try:
            self.model = timm.create_model(arch, pretrained=pretrained, num_classes=0)
        except (OSError, RuntimeError, ValueError) as err:  # hub and network errors
            why = " ".join(str(err).split())[:200]
            if not pretrained:  # e.g. an hf-hub: model whose config cannot be fetched
                raise MethodError(f"{arch} could not be built ({why})") from None
            raise MethodError(f"the published weights of {arch} could not be had ({why}); pass a local file with "
                              "--weights FILE (a timm or torchvision state dict, .pth or safetensors), or put them "
                              "in the Hugging Face cache ($HF_HOME)") from None
        cfg = self.model.pretrained_cfg
        c, h, w = cfg.get("input_size", (3, 224, 224))
        self.arch = arch
        self.classifier = cfg.get("classifier") or ()
        # a transformer whose position embedding fits one image size (timm's ViTs and EVAs unless
        # built with dynamic_img_size; SAM resamples its embedding to any size)
        fixed = hasattr(self.model, "pos_embed") and getattr(self.model, "dynamic_img_size", None) is False
        if mode == "native" and fixed:
            raise ConfigError(f"config key model.input: {arch} takes only {h}x{w} images, so native input cannot "
                              "work; use pad or resize")
        if canvas is not None and fixed and canvas != h:
            raise ConfigError(f"config key model.canvas: {arch} takes only {h}x{w} images, not {canvas}x{canvas}; "
                              f"set model.canvas to {h} or leave it unset")
        self.adapter = ImageAdapter(tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
                                    (canvas, canvas) if canvas else (h, w), "pad" if mode == "auto" else mode)
        # timm's features without a classifier: after the head's hidden layer where there is one
        # (VGG's 4096-wide pre-logits, MobileNetV3's 1024-wide conv head), not ``num_features``
        self.out_features: int = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    def load_weights(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """A timm state dict (classifier ignored) or this backbone's own."""
        if state and all(k.startswith("model.") for k in state):
            state = {k[len("model."):]: v for k, v in state.items()}
        ignore = (self.classifier,) if isinstance(self.classifier, str) else tuple(self.classifier)
        load_checked(self.model, state, source, self.arch, ignore=ignore)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.adapter(x))


class AlexNetBackbone(nn.Module):
    """torchvision's AlexNet with its last classifier layer replaced by the identity (4096
    features), ImageNet normalisation, 224px input. State-dict keys are torchvision's."""

    def __init__(self, pretrained: bool, mode: InputMode, canvas: int | None = None) -> None:
        super().__init__()
        from torchvision.models import AlexNet_Weights, alexnet

        net = alexnet()
        self.arch = "alexnet"
        self.features, self.avgpool, self.classifier = net.features, net.avgpool, net.classifier
        self.classifier[6] = nn.Identity()
        self.adapter = ImageAdapter(IMAGENET_MEAN, IMAGENET_STD, (canvas or 224,) * 2, "pad" if mode == "auto" else mode)
        self.out_features = 4096
        if pretrained:
            self.load_weights(download(AlexNet_Weights.DEFAULT.url, "alexnet"), "torchvision's AlexNet weights")

    def load_weights(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        load_checked(self, state, source, self.arch, ignore=("classifier.6",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(self.adapter(x))), 1))


def download(url: str, arch: str) -> dict[str, torch.Tensor]:
    """A torchvision state dict from its URL (torch hub cache, else download); one line offline."""
    from urllib.error import URLError

    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)
    except (URLError, OSError, RuntimeError) as err:
        file_name = url.rsplit("/", 1)[-1]
        raise MethodError(
            f"the published weights of {arch} could not be downloaded from {url} ({' '.join(str(err).split())}). "
            f"Pass a local weights file instead (--weights /path/{file_name}), put that file in "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}, or start from scratch") from err


def build_pretrained_2d(arch: str, weights: str | os.PathLike | None, mode: InputMode,
                        canvas: int | None = None) -> nn.Module:
    """A timm or torchvision backbone: random, published (``"pretrained"``) or from a file."""
    published = isinstance(weights, str) and weights == PRETRAINED
    net: TimmBackbone | AlexNetBackbone = (AlexNetBackbone(published, mode, canvas) if arch == "alexnet"
                                           else TimmBackbone(arch, published, mode, canvas))
    if weights is not None and not published:
        net.load_weights(read_weights(weights), f"weights file {os.fspath(weights)!r}")
    return net
