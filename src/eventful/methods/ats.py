"""Adaptive Token Sampling (Fayyaz et al., 2022), top-k variant: a baseline that drops patch
tokens within each frame by their significance to the class token.

Before each block listed in `budgets`, every patch still present is scored as ATS does: the
class token's attention to it in that block, times the norm of its value, summed over heads
and normalised over the patches. The `budgets[block]` highest-scored patches stay; the others
leave the sequence. The original samples tokens by the inverse transform of the scores'
cumulative distribution (an adaptive count) inside the block, after attention; this top-k
variant keeps a fixed count and scores with the block's own projections before it. It runs on
the IA-RED^2 dense runner (`eventful.methods.iared2.IARed2`), with the scores standing in for
the interpreters, so ids, padding and op counts are shared. A budget as large as the patch
count keeps every patch: the dense model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from eventful.convert import adapt_encoder, find_encoder, is_encoder
from eventful.core.description import BlockDescription
from eventful.methods.iared2 import DropResult, IARed2
from eventful.methods.token_scores import class_attention


class SignificanceScores(nn.Module):
    """ATS's significance of each patch of x (B, P + n, D) in `block`: per head the class
    token's attention to it times its value's norm, summed over heads, normalised to sum 1 over
    the patches. Needs a class token at position 0."""

    def __init__(self, block: BlockDescription) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, prefix: int) -> Tensor:
        attention, values = class_attention(self.block, x)
        attention = attention[:, :, prefix:]  # (B, H, n)
        value_norms = torch.linalg.vector_norm(values[:, prefix:], dim=-1).transpose(1, 2)
        significance = (attention * value_norms).sum(dim=1)
        return significance / significance.sum(dim=1, keepdim=True)

    def macs(self, patches: int) -> int:
        """The qkv projection of every token, the class token's logits and the value norms."""
        dim = self.block.dim
        return (1 + patches) * 3 * dim * dim + (1 + patches) * dim + patches * dim


class NoScores(nn.Module):
    """Stands in for the scores of a group that keeps every patch: nothing computed."""

    def forward(self, x: Tensor, prefix: int) -> Tensor:
        return x.new_zeros(x.shape[0], x.shape[1] - prefix)

    def macs(self, patches: int) -> int:
        return 0


class KeepBudgets:
    """Keep, in group g, the `budgets[g]` highest-scored patches still present (None: all)."""

    def __init__(self, budgets: list[int | None]) -> None:
        self.budgets = budgets

    def __call__(self, group: int, scores: Tensor, present: Tensor) -> Tensor:
        budget = self.budgets[group]
        if budget is None:
            return present
        ranked = torch.where(present, scores, float("-inf"))
        keep = torch.zeros_like(present)
        keep.scatter_(1, ranked.topk(budget, dim=1).indices, True)
        return keep & present


class ATS(nn.Module):
    """`model` (a supported encoder with a class token and global attention, or a model that
    calls one) run densely, keeping `budgets[block]` patches before each listed block (top-k
    ATS). Calls return a `DropResult` (final tokens with every patch at its place, the kept
    patches and the multiply-accumulates per frame)."""

    def __init__(self, model: nn.Module, budgets: dict[int, int]) -> None:
        super().__init__()
        encoder = model if is_encoder(model) else find_encoder(model)[1]
        description = adapt_encoder(encoder).description
        embedding = description.embedding
        if embedding.num_prefix_tokens - embedding.registers.shape[1] != 1:
            raise ValueError(
                "ATS scores patches by the class token's attention; this model has none"
            )
        depth = len(description.blocks)
        for block, budget in budgets.items():
            if not 0 <= block < depth:
                raise ValueError(f"ATS block {block} outside 0..{depth - 1}")
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise ValueError(
                    f"ATS budget at block {block} must be a positive integer, got {budget!r}"
                )
        starts = sorted({0, *budgets})
        self.runner = IARed2(description, groups=starts)
        self.budgets = [budgets.get(start) for start in starts]
        self.runner.interpreters = nn.ModuleList(
            NoScores() if budget is None else SignificanceScores(description.blocks[start])
            for start, budget in zip(starts, self.budgets, strict=True)
        )

    def forward(self, frames: Tensor) -> DropResult:
        patches = self.runner.embedding.num_tokens(*frames.shape[-2:]) - (
            self.runner.embedding.num_prefix_tokens
        )
        for start, budget in zip(self.runner.starts, self.budgets, strict=True):
            if budget is not None and budget > patches:
                raise ValueError(
                    f"ATS budget {budget} at block {start} is above the {patches} patch tokens "
                    f"of a {frames.shape[-2]}x{frames.shape[-1]} frame"
                )
        with torch.no_grad():
            return self.runner(frames, KeepBudgets(self.budgets))

    def dense_macs(self, frames: Tensor) -> int:
        return self.runner.dense_macs(frames)
