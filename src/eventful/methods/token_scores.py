"""The easy alternatives to IA-RED^2's learned interpreters: other ways to score patch tokens.

Each scorer has an interpreter's interface, (x (B, P + n, D), prefix) -> scores (B, n), higher
meaning keep, so it can stand in for an interpreter of `IARed2` (`IARed2.interpreters`). With
`KeepCounts`, each group then keeps as many tokens as a reference run kept: the scorers are
compared at equal ops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from eventful.core.description import BlockDescription


class RandomScores(nn.Module):
    """Uniform random scores, from its own generator."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor, prefix: int) -> Tensor:
        batch, tokens, _ = x.shape
        return torch.rand(batch, tokens - prefix, generator=self.generator).to(x.device)

    def macs(self, patches: int) -> int:
        return 0


class NormScores(nn.Module):
    """Each token's L2 norm: the tokens that stand out most are kept."""

    def forward(self, x: Tensor, prefix: int) -> Tensor:
        return torch.linalg.vector_norm(x[:, prefix:], dim=-1)

    def macs(self, patches: int) -> int:
        return 0


class ClassAttentionScores(nn.Module):
    """The class token's attention to each patch in `block` (the first block of the group it
    scores for), averaged over heads: the raw attention IA-RED^2's interpreters are compared
    with. Needs a class token at position 0."""

    def __init__(self, block: BlockDescription) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, prefix: int) -> Tensor:
        attention, _ = class_attention(self.block, x)
        return attention[:, :, prefix:].mean(dim=1)

    def macs(self, patches: int) -> int:
        dim = self.block.dim
        return (1 + patches) * 3 * dim * dim + (1 + patches) * dim


def class_attention(block: BlockDescription, x: Tensor) -> tuple[Tensor, Tensor]:
    """In `block`, on tokens x (B, T, D) with a class token at position 0: the class token's
    attention to every token per head (B, H, T), and every token's values (B, T, H, dh)."""
    batch, tokens, dim = x.shape
    heads = block.attention.heads
    qkv = block.qkv(block.norm1(x)).view(batch, tokens, 3, heads, dim // heads)
    query, keys = qkv[:, 0, 0], qkv[:, :, 1]  # (B, H, dh), (B, T, H, dh)
    logits = torch.einsum("bhd,bthd->bht", query, keys) * block.attention.scale
    return logits.softmax(dim=-1), qkv[:, :, 2]


class KeepCounts:
    """A keep rule that keeps, in group g of frame b, the `counts[b][g]` highest-scored tokens
    still present: the counts of a reference run, for a comparison at equal ops."""

    def __init__(self, counts: list[list[int]]) -> None:
        self.counts = counts

    def __call__(self, group: int, scores: Tensor, present: Tensor) -> Tensor:
        ranked = torch.where(present, scores, float("-inf"))
        keep = torch.zeros_like(present)
        for frame, per_group in enumerate(self.counts):
            top = ranked[frame].topk(per_group[group]).indices
            keep[frame, top] = True
        return keep & present
