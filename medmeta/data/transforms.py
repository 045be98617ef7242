"""Pixel conversion and per-image transforms.

``unit_float`` turns stored uint8 pixels into the float32 images in [0, 1] every model takes,
with the same values on every device. ``PadTo`` and ``ResizeTo`` (for
``MedMNISTTask(transform=...)``) are MedMNIST+'s ways of feeding small images to a network
built for a larger input.

MedMNIST+'s released code normalises images, then zero-pads them to the network's input size
(224): it does not resize. medmeta's 2D backbones normalise inside ``forward``, so ``PadTo``
pads with the ImageNet mean of each channel (grey images first become 3 channels): after the
backbone's normalisation the padding is exactly zero, as theirs. ``ResizeTo`` is the bilinear
alternative.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The normalisation every 2D backbone applies inside ``forward`` (``learning.models``)."""

PIXEL_DTYPES = (torch.float32, torch.uint8)
"""What images can be read as: float32 in [0, 1] (what models take), or uint8 pixels as stored
(0..255, torchvision's convention), a quarter of the bytes, converted by ``unit_float`` where
they are used (e.g. on the GPU after the transfer)."""


def check_pixel_read(where: str, dtype: torch.dtype, transform: object | None) -> None:
    """Refuse a dtype images cannot be read as, or uint8 pixels from a dataset ``where`` whose
    per-image transform takes float images: one line each, before any work."""
    if dtype not in PIXEL_DTYPES:
        raise ConfigError(f"dtype must be torch.float32 (images in [0, 1]) or torch.uint8 (pixels as stored), "
                          f"got {dtype}")
    if dtype == torch.uint8 and transform is not None:
        raise ConfigError(f"{where}: uint8 pixels are the stored images, but this dataset has a transform "
                          f"({type(transform).__name__}), which takes float images; read float32 images")


def unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape and layout, any device) as float32 in [0, 1]: ``x / 255``
    correctly rounded, so the values are identical on every device.

    On the CPU numpy's cast and in-place division (faster than torch's there, and keeping the
    memory layout); elsewhere a division by a device tensor: CUDA divides by a Python scalar as
    a multiplication by its reciprocal, one ulp away for some pixel values.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"unit_float takes uint8 pixels, got {pixels.dtype}")
    if pixels.device.type == "cpu":
        x = pixels.numpy().astype(np.float32)
        np.divide(x, np.float32(255.0), out=x)
        return torch.from_numpy(x)
    return pixels.float().div_(torch.full((), 255.0, dtype=torch.float32, device=pixels.device))


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
