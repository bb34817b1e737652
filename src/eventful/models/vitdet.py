"""ViTDet's backbone (Li et al., 2022): a plain ViT with windowed attention in most blocks,
global attention in a few, and decomposed relative position in every block.

Tokens: the patch grid only (no class token); the absolute position embedding is learned for the
pretraining grid and interpolated (bicubic) to the input's grid. A windowed block pads the grid
with zeros after its first norm to whole windows, attends within each window, and crops the
padding off again. The output is the last feature map (B, D, rows, cols), which the simple
feature pyramid of a detector takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful.core.bias import DecomposedRelativePosition
from eventful.core.description import AttentionDescription, BlockDescription, EncoderDescription
from eventful.core.partition import Windows, from_windows, to_windows
from eventful.models.vit import LayerScale, Mlp, TokenEmbedding, ViT, attention_scale


class WindowedAttention(nn.Module):
    """Attention over groups of tokens (B', L, D) laid out as a rows x cols grid, with the
    decomposed relative position bias for a grid of `bias_size` (the window, or the global grid
    the model was configured for)."""

    def __init__(self, dim: int, heads: int, bias_size: int | None) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position = None
        if bias_size is not None:
            # Small random tables (ViTDet learns them), so that an untrained model has a bias.
            tables = [torch.randn(2 * bias_size - 1, dim // heads) * 0.02 for _ in range(2)]
            self.relative_position = DecomposedRelativePosition(*tables)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        groups, length, dim = x.shape
        qkv = self.qkv(x).view(groups, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = None if self.relative_position is None else self.relative_position(q, grid)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(groups, length, dim))


class ViTDetBlock(nn.Module):
    """Pre-norm block over the token grid (B, R, C, D); `window` None means global attention."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        window: int | None,
        global_size: int,
        relative_position: bool = True,
        layer_scale_init: float | None = None,
    ) -> None:
        super().__init__()
        self.window = None if window is None else Windows(window)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        bias_size = (global_size if window is None else window) if relative_position else None
        self.attn = WindowedAttention(dim, heads, bias_size)
        self.ls1 = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))
        self.ls2 = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)

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
        x = x + self.ls1(h)
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViTDet(nn.Module):
    """ViTDet backbone: frames (B, 3, H, W) -> last feature map (B, D, H / patch, W / patch).

    `global_blocks`: indices of the blocks with global attention (ViTDet-B: 2, 5, 8, 11); the
    others attend within `window` x `window` windows. `image_size` sets the global blocks'
    relative position tables (the grid at that size); `pretrain_size` the absolute position
    embedding's grid. For backbones built from other ViTs (`vitdet_from_vit`): no relative
    position, LayerScale, and the ViT's final norm.
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
        relative_position: bool = True,
        layer_scale_init: float | None = None,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        outside = [index for index in global_blocks if not 0 <= index < depth]
        if outside:
            raise ValueError(f"global block indices {outside} outside 0..{depth - 1}")
        Windows(window)  # checks the size
        self.dim = dim
        self.heads = heads
        self.global_blocks = tuple(global_blocks)
        self.embedding = TokenEmbedding(pretrain_size, patch_size, dim, class_token=False)
        global_size = image_size // patch_size
        self.blocks = nn.ModuleList(
            ViTDetBlock(
                dim,
                heads,
                mlp_ratio,
                None if i in global_blocks else window,
                global_size,
                relative_position,
                layer_scale_init,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6) if final_norm else nn.Identity()

    def forward(self, frames: Tensor) -> Tensor:
        rows, cols = self.embedding.grid_size(*frames.shape[-2:])
        tokens = self.embedding(frames)
        x = tokens.view(frames.shape[0], rows, cols, self.dim)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).permute(0, 3, 1, 2)


def evenly_spaced_global_blocks(depth: int, count: int = 4) -> tuple[int, ...]:
    """The last block of each of `count` equal stages, as ViTDet places its global blocks
    (depth 12: 2, 5, 8, 11)."""
    if not 1 <= count <= depth or depth % count != 0:
        raise ValueError(f"cannot split {depth} blocks into {count} equal stages")
    stage = depth // count
    return tuple(stage * (i + 1) - 1 for i in range(count))


def vitdet_from_vit(vit: ViT, window: int, global_blocks: tuple[int, ...]) -> ViTDet:
    """A ViTDet-style backbone holding a copy of a plain ViT's weights: windowed attention in
    every block but `global_blocks`, no class token (its position dropped), no relative
    position, the ViT's LayerScale and final norm. Not a trained detector: the ViT was trained
    with global attention, so its windowed features differ (BENCHMARKS.md says by how much).
    """
    embedding = vit.embedding
    if embedding.num_prefix_tokens != 1 or embedding.class_token is None:
        raise ValueError(
            "vitdet_from_vit expects a ViT with a class token and no registers, got "
            f"{embedding.num_prefix_tokens} prefix tokens"
        )
    first = vit.blocks[0]
    size = embedding.grid * embedding.patch_size
    model = ViTDet(
        image_size=size,
        patch_size=embedding.patch_size,
        dim=vit.dim,
        depth=len(vit.blocks),
        heads=vit.heads,
        mlp_ratio=first.mlp.fc1.out_features / vit.dim,
        window=window,
        global_blocks=global_blocks,
        pretrain_size=size,
        relative_position=False,
        layer_scale_init=1.0 if isinstance(first.ls1, LayerScale) else None,
        final_norm=True,
    )
    model.embedding.interpolate_antialias = embedding.interpolate_antialias
    with torch.no_grad():
        model.embedding.patch_projection.load_state_dict(embedding.patch_projection.state_dict())
        model.embedding.position.copy_(embedding.position[:, 1:])
        for ours, theirs in zip(model.blocks, vit.blocks, strict=True):
            for name in ("norm1", "norm2", "mlp", "ls1", "ls2"):
                getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())
            ours.norm1.eps, ours.norm2.eps = theirs.norm1.eps, theirs.norm2.eps
            ours.attn.qkv.load_state_dict(theirs.attn.qkv.state_dict())
            ours.attn.proj.load_state_dict(theirs.attn.proj.state_dict())
        model.norm.load_state_dict(vit.norm.state_dict())
        model.norm.eps = vit.norm.eps
    return model.to(embedding.position.dtype).eval()


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
                layer_scale1=_layer_scale(block.ls1),
                layer_scale2=_layer_scale(block.ls2),
            )
        )
    return EncoderDescription(model.embedding, tuple(blocks), model.norm)


def _layer_scale(module: nn.Module) -> Tensor | None:
    return module.gamma.detach() if isinstance(module, LayerScale) else None
