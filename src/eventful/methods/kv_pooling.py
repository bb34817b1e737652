"""K/V pooling alone (a baseline): a supported encoder run densely on every frame, its global
attention over the prefix tokens and the patches' keys and values averaged over factor x
factor cells of the grid (`eventful.core.kv_pooling`). Combined with temporal gates, it is
`EventfulViT.kv_pooling` at the tokenwise level."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eventful.convert import adapt_encoder, find_encoder, is_encoder
from eventful.core.description import BlockDescription
from eventful.core.kv_pooling import check_factor, check_pooling, pooled_attention_macs
from eventful.core.ops import linear_macs
from eventful.methods.iared2 import dense_block


@dataclass
class PooledResult:
    """tokens (B, T, D): the final-norm tokens; macs: multiply-accumulates per frame."""

    tokens: Tensor
    macs: int


class KVPooling(nn.Module):
    """`model` (a supported encoder with global attention, or a model that calls one) run
    densely with keys and values pooled by `factor`; factor 1 is the dense model."""

    def __init__(self, model: nn.Module, factor: int) -> None:
        super().__init__()
        encoder = model if is_encoder(model) else find_encoder(model)[1]
        description = adapt_encoder(encoder).description
        if description.partitioned_blocks:
            raise ValueError("K/V pooling applies to global attention; this model has windows")
        check_factor(factor)
        self.embedding = description.embedding
        self.blocks = description.blocks
        self.norm = description.norm
        self.factor = factor

    @torch.no_grad()
    def forward(self, frames: Tensor) -> PooledResult:
        grid = self.embedding.grid_size(*frames.shape[-2:])
        check_pooling(self.factor, grid)
        tokens = self.embedding(frames)
        macs = 0
        for block in self.blocks:
            tokens = dense_block(block, tokens, pool=(grid, self.factor))
            macs += block_macs(block, tokens.shape[1], grid, self.factor)
        return PooledResult(self.norm(tokens), macs)


def block_macs(block: BlockDescription, tokens: int, grid: tuple[int, int], factor: int) -> int:
    """One stream of a block with pooled attention: its linear layers, the pooled attention
    and its averaging, and the two residual adds."""
    linear = sum(
        linear_macs(tokens, layer) for layer in (block.qkv, block.proj, block.fc1, block.fc2)
    )
    attention, adds = pooled_attention_macs(tokens, block.dim, grid, factor)
    return linear + attention + adds + 2 * tokens * block.dim
