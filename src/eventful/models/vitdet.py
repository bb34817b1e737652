"""ViTDet's backbone (Li et al., 2022): a plain ViT with windowed attention in most blocks,
global attention in a few, and decomposed relative position in every block.

Tokens: the patch grid only (no class token); the absolute position embedding is learned for the
pretraining grid and interpolated (bicubic) to the input's grid. A windowed block pads the grid
with zeros after its first norm to whole windows, attends within each window, and crops the
padding off again. The output is the last feature map (B, D, rows, cols), which the simple
feature pyramid of a detector takes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from eventful.core.bias import DecomposedRelativePosition
from eventful.core.description import AttentionDescription, BlockDescription, EncoderDescription
from eventful.core.partition import Windows, from_windows, to_windows
from eventful.models.vit import Mlp, TokenEmbedding, attention_scale


class WindowedAttention(nn.Module):
    """Attention over groups of tokens (B', L, D) laid out as a rows x cols grid, with the
    decomposed relative position bias for a grid of `bias_size` (the window, or the global grid
    the model was configured for)."""

    def __init__(self, dim: int, heads: int, bias_size: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // heads
        zeros = nn.init.trunc_normal_  # small random tables, so that tests exercise the bias
        tables = [
            zeros(x.new_empty(2 * bias_size - 1, head_dim), std=0.02)
            for x in (self.qkv.weight, self.qkv.weight)
        ]
        self.relative_position = DecomposedRelativePosition(*tables)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        groups, length, dim = x.shape
        qkv = self.qkv(x).view(groups, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position(q, grid)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(groups, length, dim))


class ViTDetBlock(nn.Module):
    """Pre-norm block over the token grid (B, R, C, D); `window` None means global attention."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, window: int | None, global_size: int
    ) -> None:
        super().__init__()
        self.window = None if window is None else Windows(window)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = WindowedAttention(dim, heads, global_size if window is None else window)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        batch, rows, cols, dim = x.shape
        h = self.norm1(x)
        if self.window is None:
            h = self.attn(h.reshape(batch, rows * cols, dim), (rows, cols))
            h = h.view(batch, rows, cols, dim)
        else:
            size = self.window.size
            padded_rows, padded_cols = self.window.padded_grid(rows, cols)
            h = F.pad(h, (0, 0, 0, padded_cols - cols, 0, padded_rows - rows))
            h = self.attn(to_windows(h, size), (size, size))
            h = from_windows(h, batch, padded_rows, padded_cols, size)[:, :rows, :cols]
        x = x + h
        return x + self.mlp(self.norm2(x))


class ViTDet(nn.Module):
    """ViTDet backbone: frames (B, 3, H, W) -> last feature map (B, D, H / patch, W / patch).

    `global_blocks`: indices of the blocks with global attention (ViTDet-B: 2, 5, 8, 11); the
    others attend within `window` x `window` windows. `image_size` sets the global blocks'
    relative position tables (the grid at that size); `pretrain_size` the absolute position
    embedding's grid.
    """

    def __init__(
        self,
        image_size: int = 1024,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        window: int = 14,
        global_blocks: tuple[int, ...] = (2, 5, 8, 11),
        pretrain_size: int = 224,
    ) -> None:
        super().__init__()
        outside = [index for index in global_blocks if not 0 <= index < depth]
        if outside:
            raise ValueError(f"global block indices {outside} outside 0..{depth - 1}")
        self.dim = dim
        self.global_blocks = tuple(global_blocks)
        self.embedding = TokenEmbedding(pretrain_size, patch_size, dim, class_token=False)
        global_size = image_size // patch_size
        self.blocks = nn.ModuleList(
            ViTDetBlock(dim, heads, mlp_ratio, None if i in global_blocks else window, global_size)
            for i in range(depth)
        )

    def forward(self, frames: Tensor) -> Tensor:
        rows, cols = self.embedding.grid_size(*frames.shape[-2:])
        tokens = self.embedding(frames)
        x = tokens.view(frames.shape[0], rows, cols, self.dim)
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)


class FeatureMap(nn.Module):
    """Tokens (B, rows * cols, D) of the patch grid -> feature map (B, D, rows, cols)."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, tokens: Tensor, pixel_values: Tensor) -> Tensor:
        rows = pixel_values.shape[-2] // self.patch_size
        cols = pixel_values.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols)


def describe_vitdet(model: ViTDet) -> EncoderDescription:
    """The engine's description of a `ViTDet` backbone (its modules; the engine copies)."""
    blocks = []
    for block in model.blocks:
        attention = block.attn
        blocks.append(
            BlockDescription(
                norm1=block.norm1,
                qkv=attention.qkv,
                proj=attention.proj,
                norm2=block.norm2,
                fc1=block.mlp.fc1,
                activation=nn.GELU(),
                fc2=block.mlp.fc2,
                attention=AttentionDescription(
                    heads=attention.heads,
                    scale=attention_scale(model.dim, attention.heads),
                    window=block.window,
                    bias=attention.relative_position,
                ),
            )
        )
    return EncoderDescription(model.embedding, tuple(blocks), nn.Identity())
