"""What the engine runs: a description of an encoder and of each of its blocks.

Each model family's adapter (`eventful.models`) reads its modules once, at conversion, and
returns an `EncoderDescription`; the engine builds its eventful blocks from that alone, so it
imports no model code and no transformers. A description holds the original modules; the
eventful copy copies them and leaves the original model untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from eventful.core.partition import Windows


class TokenEmbedder(Protocol):
    """The embedding an encoder starts with: frames (B, C, H, W) -> tokens (B, T, D).

    T = num_prefix_tokens + rows * columns of the patch grid; the prefix tokens (a class token,
    registers, or none) come first. The engine also reads its parameters' device and dtype.
    """

    in_chans: int
    patch_size: int

    @property
    def num_prefix_tokens(self) -> int: ...

    def grid_size(self, height: int, width: int) -> tuple[int, int]: ...

    def num_tokens(self, height: int, width: int) -> int: ...

    def __call__(self, frames: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class AttentionDescription:
    """Softmax attention: `heads` heads, logits q . k times `scale`.

    window: None for global attention over all tokens; `Windows(size)` for attention within
    windows of the patch grid (no prefix tokens). bias: None, or a module giving the additive
    logit bias from the queries before the scale (no prefix tokens either), as
    `DecomposedRelativePosition` does: `bias(q, grid)` -> (..., L, L) over the L = rows * cols
    tokens of one attention group, `bias.between(q, grid, rows, cols)` for some rows and
    columns, `bias.scaled(factor)` a copy scaled by `factor`.
    """

    heads: int
    scale: float
    window: Windows | None = None
    bias: nn.Module | None = None

    @property
    def partitioned(self) -> bool:
        """Whether attention runs over groups of the patch grid (windows) or needs the grid
        (a bias): either way, on the patch grid, not on any set of tokens."""
        return self.window is not None or self.bias is not None


@dataclass(frozen=True)
class BlockDescription:
    """A pre-norm transformer block:

        y = x + layer_scale1 * proj(attention(qkv(norm1(x))))
        z = y + layer_scale2 * fc2(activation(fc1(norm2(y))))

    `qkv` is one fused projection whose outputs are q, k and v in that order, each split into
    `attention.heads` contiguous heads. A layer scale of None multiplies by one.
    """

    norm1: nn.Module
    qkv: nn.Linear
    proj: nn.Linear
    norm2: nn.Module
    fc1: nn.Linear
    activation: nn.Module
    fc2: nn.Linear
    attention: AttentionDescription
    layer_scale1: Tensor | None = None
    layer_scale2: Tensor | None = None

    @property
    def dim(self) -> int:
        return self.proj.out_features

    def validate(self) -> None:
        """Raise ValueError, naming the sizes, if the parts do not fit together."""
        dim, heads = self.dim, self.attention.heads
        checks = [
            ("qkv", self.qkv.in_features, self.qkv.out_features, dim, 3 * dim),
            ("proj", self.proj.in_features, self.proj.out_features, dim, dim),
            ("fc1", self.fc1.in_features, self.fc1.out_features, dim, self.fc1.out_features),
            ("fc2", self.fc2.in_features, self.fc2.out_features, self.fc1.out_features, dim),
        ]
        for name, got_in, got_out, want_in, want_out in checks:
            if (got_in, got_out) != (want_in, want_out):
                raise ValueError(
                    f"block description: {name} maps {got_in} -> {got_out} features, "
                    f"expected {want_in} -> {want_out} for width {dim}"
                )
        if heads < 1 or dim % heads != 0:
            raise ValueError(f"block description: {heads} heads do not split width {dim} evenly")
        scales = {"layer_scale1": self.layer_scale1, "layer_scale2": self.layer_scale2}
        for name, scale in scales.items():
            if scale is not None and tuple(scale.shape) != (dim,):
                raise ValueError(
                    f"block description: {name} has shape {tuple(scale.shape)}, expected ({dim},)"
                )


@dataclass(frozen=True)
class EncoderDescription:
    """An encoder: embedding, blocks in order, final norm (nn.Identity() for none)."""

    embedding: nn.Module
    blocks: tuple[BlockDescription, ...]
    norm: nn.Module

    @property
    def partitioned_blocks(self) -> list[int]:
        """The blocks whose attention is partitioned (`AttentionDescription.partitioned`)."""
        return [index for index, block in enumerate(self.blocks) if block.attention.partitioned]

    def validate(self) -> None:
        if not self.blocks:
            raise ValueError("encoder description: expected at least one block, got none")
        for block in self.blocks:
            block.validate()
