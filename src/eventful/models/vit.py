"""The canonical plain-PyTorch ViT that every adapter fills and `eventful.convert` reads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful.core.description import (
    AttentionDescription,
    BlockDescription,
    EncoderDescription,
)
from eventful.core.fingerprint import tensor_key


class TokenEmbedding(nn.Module):
    """Frames (B, C, H, W) -> tokens (B, C + R + N, D): a class token (C = 1, or none with
    `class_token=False`), R registers, N patches.

    The learned position embedding covers the class token and a square grid of patches for
    `image_size`; other input sizes interpolate the patch part (bicubic). Registers carry no
    position embedding and sit between the class token and the patches, as in DINOv2.

    Outside autograd, the interpolated embedding of the last grid is kept and reused while the
    grid and the position parameter stay the same (a video keeps its frame size); a new grid, or
    a change of the parameter (loading weights, moving the module), computes it anew.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        dim: int,
        in_chans: int = 3,
        num_registers: int = 0,
        interpolate_antialias: bool = False,
        class_token: bool = True,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(
                f"image_size {image_size} must be a multiple of patch_size {patch_size}"
            )
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid = image_size // patch_size
        self.interpolate_antialias = interpolate_antialias
        self.patch_projection = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.registers = nn.Parameter(torch.zeros(1, num_registers, dim))
        classes = int(class_token)
        self.position = nn.Parameter(torch.zeros(1, classes + self.grid * self.grid, dim))
        if class_token:
            nn.init.trunc_normal_(self.class_token, std=0.02)
        nn.init.trunc_normal_(self.registers, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)
        self._interpolated: tuple[tuple, Tensor] | None = None  # (key, embedding) of one grid

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token (if any) and the registers."""
        return self._classes + self.registers.shape[1]

    @property
    def _classes(self) -> int:
        return 0 if self.class_token is None else 1

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, columns) for an input of height x width pixels."""
        return height // self.patch_size, width // self.patch_size

    def num_tokens(self, height: int, width: int) -> int:
        rows, cols = self.grid_size(height, width)
        return self.num_prefix_tokens + rows * cols

    def position_for_grid(self, rows: int, cols: int) -> Tensor:
        """Position embedding (1, C + rows * cols, D), interpolated when the grid differs."""
        if rows == self.grid and cols == self.grid:
            return self.position
        if torch.is_grad_enabled() and self.position.requires_grad:
            return self._interpolate(rows, cols)
        key = (rows, cols, tensor_key(self.position))
        if self._interpolated is None or self._interpolated[0] != key:
            self._interpolated = (key, self._interpolate(rows, cols))
        return self._interpolated[1]

    def clear_weight_caches(self) -> None:
        """Forget the interpolated position embedding (`forget_weight_caches`)."""
        self._interpolated = None

    def _interpolate(self, rows: int, cols: int) -> Tensor:
        class_position = self.position[:, : self._classes]
        patch_position = self.position[:, self._classes :]
        dim = patch_position.shape[-1]
        patch_position = patch_position.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        patch_position = F.interpolate(
            patch_position.float(),
            size=(rows, cols),
            mode="bicubic",
            align_corners=False,
            antialias=self.interpolate_antialias,
        ).to(self.position.dtype)
        patch_position = patch_position.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
        return torch.cat([class_position, patch_position], dim=1)

    def forward(self, frames: Tensor) -> Tensor:
        batch = frames.shape[0]
        patches = self.patch_projection(frames)
        rows, cols = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)
        if self.class_token is not None:
            patches = torch.cat([self.class_token.expand(batch, -1, -1), patches], dim=1)
        tokens = patches + self.position_for_grid(rows, cols)
        if self.registers.shape[1] == 0:
            return tokens
        registers = self.registers.expand(batch, -1, -1)
        classes = self._classes
        return torch.cat([tokens[:, :classes], registers, tokens[:, classes:]], dim=1)


class LayerScale(nn.Module):
    """Per-channel scaling of a residual branch (CaiT, DINOv2)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; tokens (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: y = x + ls1(attn(norm1(x))); z = y + ls2(mlp(norm2(y)))."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        qkv_bias: bool = True,
        layer_scale_init: float | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.ls1 = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))
        self.ls2 = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """A plain ViT encoder: frames (B, C, H, W) -> final-norm tokens (B, prefix + N, D), the
    prefix being the class token (unless `class_token=False`) and R registers.

    Any H, W of at least one patch works; the patch grid is H // patch_size by W // patch_size.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        num_registers: int = 0,
        layer_scale_init: float | None = None,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        interpolate_antialias: bool = False,
        class_token: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.embedding = TokenEmbedding(
            image_size, patch_size, dim, in_chans, num_registers, interpolate_antialias, class_token
        )
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, qkv_bias, layer_scale_init, norm_eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    @property
    def patch_size(self) -> int:
        return self.embedding.patch_size

    def forward(self, frames: Tensor) -> Tensor:
        tokens = self.embedding(frames)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


def attention_scale(dim: int, heads: int) -> float:
    """The softmax temperature 1 / sqrt(head dim) of scaled dot-product attention."""
    return 1.0 / math.sqrt(dim // heads)


def describe_block(block: Block) -> BlockDescription:
    """The engine's description of a `Block` (its modules, not copies)."""

    def layer_scale(module: nn.Module) -> Tensor | None:
        return module.gamma.detach() if isinstance(module, LayerScale) else None

    dim, heads = block.attn.proj.out_features, block.attn.heads
    return BlockDescription(
        norm1=block.norm1,
        qkv=block.attn.qkv,
        proj=block.attn.proj,
        norm2=block.norm2,
        fc1=block.mlp.fc1,
        activation=nn.GELU(),
        fc2=block.mlp.fc2,
        attention=AttentionDescription(heads=heads, scale=attention_scale(dim, heads)),
        layer_scale1=layer_scale(block.ls1),
        layer_scale2=layer_scale(block.ls2),
    )


def describe_vit(vit: ViT) -> EncoderDescription:
    """The engine's description of a `ViT` (its modules, not copies: the engine copies)."""
    blocks = tuple(describe_block(block) for block in vit.blocks)
    return EncoderDescription(vit.embedding, blocks, vit.norm)
