"""A factorised ViViT (Arnab et al., 2021, model 2, "factorised encoder"): a spatial ViT runs on
each time step of a clip, a temporal transformer runs over the steps' class tokens, and a
linear classifier reads the clip's token.

A time step is a tubelet: `tubelet` consecutive frames. Its patches (tubelet x patch x patch
pixels) are embedded by one projection over the tubelet's frames stacked along the channels,
so the spatial model is a plain `ViT` with `in_chans = channels * tubelet` that takes a time
step as one image (`tubelet_steps`). This is the same computation as a Conv3d tubelet
embedding with kernel and stride (tubelet, patch, patch), and it lets the eventful engine run
the spatial model as it runs any ViT, one time step per stream step.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from eventful.models.vit import Block, ViT


def tubelet_steps(clip: Tensor, tubelet: int) -> Tensor:
    """Clip (B, T, C, H, W) -> time steps (B, S, C * tubelet, H, W), S = ceil(T / tubelet).

    A clip whose length is not a multiple of the tubelet (a clip shorter than one tubelet
    included) is padded by repeating its last frame.
    """
    if clip.dim() != 5:
        raise ValueError(f"expected a clip (B, T, C, H, W), got shape {tuple(clip.shape)}")
    batch, frames, channels, height, width = clip.shape
    if frames == 0:
        raise ValueError("expected a clip of at least one frame, got 0")
    missing = -frames % tubelet
    if missing:
        clip = torch.cat([clip, clip[:, -1:].expand(-1, missing, -1, -1, -1)], dim=1)
    steps = clip.shape[1] // tubelet
    return clip.reshape(batch, steps, tubelet * channels, height, width)


class TemporalTransformer(nn.Module):
    """The class tokens of a clip's time steps (B, S, D) -> the clip's token (B, D): a class
    token, a learned position embedding per time step (up to `max_steps`), pre-norm blocks
    and a final norm; the clip's token is the class token's output."""

    def __init__(self, dim: int, depth: int, heads: int, max_steps: int) -> None:
        super().__init__()
        self.max_steps = max_steps
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.zeros(1, 1 + max_steps, dim))
        nn.init.trunc_normal_(self.class_token, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, steps: Tensor) -> Tensor:
        count = steps.shape[1]
        if not 1 <= count <= self.max_steps:
            raise ValueError(
                f"the temporal transformer takes 1 to {self.max_steps} time steps, got {count}"
            )
        batch = steps.shape[0]
        tokens = torch.cat([self.class_token.expand(batch, -1, -1), steps], dim=1)
        tokens = tokens + self.position[:, : 1 + count]
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


class ViViT(nn.Module):
    """Clips (B, T, C, H, W) -> class logits (B, num_classes). `spatial` is a ViT with a class
    token whose `in_chans` is the clip's channels times `tubelet`."""

    def __init__(
        self,
        spatial: ViT,
        tubelet: int = 2,
        temporal_depth: int = 4,
        temporal_heads: int | None = None,
        num_classes: int = 400,
        max_steps: int = 16,
    ) -> None:
        super().__init__()
        embedding = spatial.embedding
        if isinstance(tubelet, bool) or not isinstance(tubelet, int) or tubelet < 1:
            raise ValueError(f"tubelet must be a positive integer, got {tubelet!r}")
        if embedding.in_chans % tubelet:
            raise ValueError(
                f"the spatial model takes {embedding.in_chans} channels, not a multiple of "
                f"the tubelet's {tubelet} frames"
            )
        if embedding.class_token is None:
            raise ValueError("the spatial model needs a class token: the temporal model reads it")
        self.spatial = spatial
        self.tubelet = tubelet
        self.channels = embedding.in_chans // tubelet
        dim = spatial.dim
        heads = temporal_heads or spatial.heads
        self.temporal = TemporalTransformer(dim, temporal_depth, heads, max_steps)
        self.head = nn.Linear(dim, num_classes)

    def steps(self, clip: Tensor) -> Tensor:
        """The clip's time steps (B, S, C * tubelet, H, W) (`tubelet_steps`), after checking
        its channels."""
        if clip.dim() == 5 and clip.shape[2] != self.channels:
            raise ValueError(
                f"expected clips of {self.channels} channels (B, T, {self.channels}, H, W), got "
                f"{tuple(clip.shape)}"
            )
        return tubelet_steps(clip, self.tubelet)

    def classify(self, class_tokens: Tensor) -> Tensor:
        """The spatial class tokens of a clip's time steps (B, S, D) -> logits (B, classes)."""
        return self.head(self.temporal(class_tokens))

    def forward(self, clip: Tensor) -> Tensor:
        steps = self.steps(clip)
        batch, count = steps.shape[:2]
        tokens = self.spatial(steps.flatten(0, 1))
        return self.classify(tokens[:, 0].reshape(batch, count, -1))


def inflate(spatial: ViT, tubelet: int) -> ViT:
    """A copy of an image ViT whose patch projection takes a tubelet of `tubelet` frames: the
    filter is repeated over the frames and divided by their number (ViViT's "filter inflation"),
    so a tubelet of identical frames gives the image model's tokens."""
    inflated = copy.deepcopy(spatial)
    projection = spatial.embedding.patch_projection
    weight = projection.weight.detach().repeat(1, tubelet, 1, 1) / tubelet
    layer = nn.Conv2d(
        projection.in_channels * tubelet,
        projection.out_channels,
        kernel_size=projection.kernel_size,
        stride=projection.stride,
    ).to(weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(projection.bias)
    inflated.embedding.patch_projection = layer
    inflated.embedding.in_chans = projection.in_channels * tubelet
    return inflated
