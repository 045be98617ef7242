"""Per-image transforms for ``MedMNISTTask(transform=...)``: MedMNIST+'s ways of feeding small
images to a network built for a larger input.

MedMNIST+'s released code normalises images, then zero-pads them to the network's input size
(224): it does not resize. medmeta's 2D backbones normalise inside ``forward``, so ``PadTo``
pads with the ImageNet mean of each channel (grey images first become 3 channels): after the
backbone's normalisation the padding is exactly zero, as theirs. ``ResizeTo`` is the bilinear
alternative.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The normalisation every 2D backbone applies inside ``forward`` (``learning.models``)."""


class PadTo:
    """Centre an image (C, H, W) in a ``size`` x ``size`` canvas filled with the channel means."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        h, w = x.shape[-2:]
        if h > self.size or w > self.size:
            raise ValueError(f"cannot pad a {h}x{w} image to {self.size}")
        top, left = (self.size - h) // 2, (self.size - w) // 2
        out = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1).expand(3, self.size, self.size).clone()
        out[:, top:top + h, left:left + w] = x
        return out

    def __repr__(self) -> str:
        return f"PadTo({self.size})"


class ResizeTo:
    """Bilinear resize of an image (C, H, W) to ``size`` x ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.unsqueeze(0), size=(self.size, self.size), mode="bilinear", align_corners=False)[0]

    def __repr__(self) -> str:
        return f"ResizeTo({self.size})"
