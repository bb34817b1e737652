"""A synthetic moving scene: a static textured background with squares sliding across it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def moving_squares(
    num_frames: int,
    size: int = 224,
    batch: int = 1,
    num_squares: int = 3,
    seed: int = 0,
) -> Tensor:
    """Frames (T, B, 3, size, size), roughly zero-mean unit-variance like normalised images.

    Each stream of the batch has its own background and squares; squares move a few pixels
    per frame, so most patches stay unchanged from one frame to the next.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, 8, 8, generator=generator)
    background = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    side = max(4, size // 8)
    start = torch.rand(batch, num_squares, 2, generator=generator) * (size - side)
    velocity = (torch.rand(batch, num_squares, 2, generator=generator) - 0.5) * (size / 20)
    colours = torch.randn(batch, num_squares, 3, generator=generator) * 1.5
    frames = background.unsqueeze(0).repeat(num_frames, 1, 1, 1, 1)
    for t in range(num_frames):
        corners = (start + velocity * t).remainder(size - side).long()
        for b in range(batch):
            for square in range(num_squares):
                row, col = corners[b, square].tolist()
                frames[t, b, :, row : row + side, col : col + side] = colours[
                    b, square, :, None, None
                ]
    return frames
