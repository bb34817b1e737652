"""Multiply-accumulate counts of an eventful step, derived from shapes and selection sizes.

Conventions (the paper's code): a linear layer costs input elements x out_features plus one
add per output element for its bias; a matmul costs output elements x inner dimension; an add
or subtraction costs one per output element. LayerNorm, softmax, GELU, the patch embedding and
the final norm are not counted; LayerScale and the attention scale are folded into weights.
A convolution costs output elements x (input channels / groups x kernel elements), a transposed
convolution input elements x (output channels / groups x kernel elements), each plus one add
per output element for its bias; normalisation, activations and resizing are not counted.

Categories:
- "linear": the token-wise linear layers (qkv, output projection, MLP);
- "attention": the query-key and attention-value matmuls, dense or incremental;
- "adds": residual adds and accumulation into the cached attention-value product;
- "gates": gate errors and their norms, the deltas of the delta gates, and the scoring of a
  token reduction (IA-RED^2's interpreters inside an eventful step);
- "head": the linear and convolution layers a wrapped model runs on the encoder's tokens (a
  classifier, the saliency decoder): `layer_macs` of each, as they ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from eventful.core.attention import (
    dense_attention_cost,
    exact_update_is_dense,
    full_update_is_dense,
)
from eventful.core.gates import GateStep
from eventful.core.kv_pooling import pooled_attention_macs
from eventful.core.selection import Selection

CATEGORIES = ("linear", "attention", "adds", "gates", "head")
HEAD_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass
class StepTrace:
    """What one step ran: per block, what each gate selected and left undone; fresh streams."""

    num_tokens: int
    fresh_streams: list[int]
    # The patch grid (rows, columns) of the step's input; windows and biases need it.
    grid: tuple[int, int] | None = None
    # Per block: the Selection of each gate ("qkv", "proj", "mlp").
    blocks: list[dict[str, Selection]] = field(default_factory=list)
    # Per block and stream: rows the full or exact level recomputed beyond the selection.
    recomputed_rows: list[list[int]] = field(default_factory=list)
    # Per block and gate: per stream (B,), the unprocessed share the gate left (gates.py).
    unprocessed: list[dict[str, Tensor]] = field(default_factory=list)
    # Per block and gate: per stream, the tokens escalation added (escalation.py; 0 if none).
    escalated: list[dict[str, list[int]]] = field(default_factory=list)
    # Per block: per stream, (multiply-accumulates, adds) of the attention where the block's
    # attention path counted them itself (grouped exact attention), else None.
    attention_costs: list[list[tuple[int, int]] | None] = field(default_factory=list)
    # Multiply-accumulates of the head's layers (`HEAD_LAYERS`) in this step, whole batch;
    # what the dense model's head costs on the same input.
    head_macs: int = 0
    head_dense_macs: int = 0
    # Per stream: multiply-accumulates of a token reduction's scoring (core/reduction.py).
    reduction_macs: list[int] = field(default_factory=list)

    def record_block(
        self,
        gates: dict[str, GateStep],
        recomputed_rows: list[int],
        attention_costs: list[tuple[int, int]] | None = None,
    ) -> None:
        """Append one block's gate steps, the rows its attention recomputed and, where the
        attention path counted itself (attention groups), its (multiply-accumulates, adds)
        per stream."""
        self.attention_costs.append(attention_costs)
        self.blocks.append({name: step.selection for name, step in gates.items()})
        self.unprocessed.append({name: step.unprocessed for name, step in gates.items()})
        batch = len(recomputed_rows)
        self.escalated.append({name: step.escalated or [0] * batch for name, step in gates.items()})
        self.recomputed_rows.append(recomputed_rows)

    @property
    def unprocessed_share(self) -> Tensor:
        """Per stream (B,), the step's unprocessed share: that of every gate of every block,
        averaged. 0 on a dense step; it grows with every token left stale."""
        shares = [share for block in self.unprocessed for share in block.values()]
        return torch.stack(shares).mean(0)


@dataclass
class OpCount:
    """Multiply-accumulates of one step, per stream and category, with the dense figure."""

    per_stream: list[dict[str, int]]
    dense_per_stream: list[int]
    # Per stream: the part of per_stream spent on tokens that escalation added beyond the
    # policy's selection (eventful.core.escalation); included in per_stream.
    escalated_per_stream: list[int] = field(default_factory=list)
    # Per stream: the dense model's head on the same input; included in dense_per_stream.
    head_dense_per_stream: list[int] = field(default_factory=list)

    @property
    def head(self) -> int:
        """Multiply-accumulates of the head (category "head"), summed over the batch."""
        return sum(stream["head"] for stream in self.per_stream)

    @property
    def head_dense(self) -> int:
        """Multiply-accumulates of the dense model's head, summed over the batch."""
        return sum(self.head_dense_per_stream)

    @property
    def escalated(self) -> int:
        """Multiply-accumulates spent on escalated tokens, summed over the batch."""
        return sum(self.escalated_per_stream)

    @property
    def total(self) -> int:
        """Eventful multiply-accumulates, summed over the batch."""
        return sum(sum(stream.values()) for stream in self.per_stream)

    @property
    def dense(self) -> int:
        """Multiply-accumulates of the dense model on the same input, summed over the batch."""
        return sum(self.dense_per_stream)

    @property
    def by_category(self) -> dict[str, int]:
        return {name: sum(stream[name] for stream in self.per_stream) for name in CATEGORIES}


def layer_macs(layer: nn.Module, inputs: Tensor, output: Tensor) -> int:
    """Multiply-accumulates of one call of a linear or convolution layer (`HEAD_LAYERS`)."""
    return layer_macs_of_sizes(layer, inputs.numel(), output.numel())


def layer_macs_of_sizes(layer: nn.Module, input_values: int, output_values: int) -> int:
    """`layer_macs` of a call whose input and output hold that many values."""
    bias = output_values if getattr(layer, "bias", None) is not None else 0
    if isinstance(layer, nn.Linear):
        return output_values * layer.in_features + bias
    kernel = math.prod(layer.kernel_size)
    if layer.transposed:
        return input_values * (layer.out_channels // layer.groups) * kernel + bias
    return output_values * (layer.in_channels // layer.groups) * kernel + bias


def linear_macs(rows: int, layer: nn.Linear) -> int:
    bias = layer.out_features if layer.bias is not None else 0
    return rows * (layer.in_features * layer.out_features + bias)


def dense_attention_macs(
    block: nn.Module, num_tokens: int, grid: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Multiply-accumulates and adds of one stream's attention over all its queries.

    Global: q k^T and A v over n x n (2 n^2 d). Windows: the same within each window of L
    tokens (the padded grid's windows: 2 W L^2 d). A decomposed relative position bias adds,
    per group of L tokens on an r x c grid, each query's dot products with the r + c table rows
    it uses (L (r + c) d) and two adds per logit and head. `grid` (patch rows, columns) is
    needed for windows and biases. `block`: an `EventfulBlock`, or a `BlockDescription`.
    """
    attention = getattr(block, "attention", block)  # heads, window and bias of either
    if attention.window is None and attention.bias is None:
        return dense_attention_cost(num_tokens, block.dim, attention.heads)
    if grid is None:
        raise ValueError("counting windowed or biased attention needs the patch grid")
    if attention.window is None:
        groups, length, sides = 1, num_tokens, grid
    else:
        size = attention.window.size
        groups, length, sides = attention.window.count(*grid), size * size, (size, size)
    bias_sides = None if attention.bias is None else sides
    macs, adds = dense_attention_cost(length, block.dim, attention.heads, bias_sides)
    return groups * macs, groups * adds


def dense_block_macs(
    block: nn.Module, num_tokens: int, grid: tuple[int, int] | None = None
) -> dict[str, int]:
    """One stream of one block (an `EventfulBlock` or a `BlockDescription`) run densely. A
    windowed block's linear layers run on the real tokens only: the padding's projections are
    constant (block.py)."""
    n, d = num_tokens, block.dim
    linear = (
        linear_macs(n, block.qkv)
        + linear_macs(n, block.proj)
        + linear_macs(n, block.fc1)
        + linear_macs(n, block.fc2)
    )
    attention, bias_adds = dense_attention_macs(block, n, grid)
    return {"linear": linear, "attention": attention, "adds": 2 * n * d + bias_adds, "gates": 0}


def eventful_block_macs(
    block: nn.Module,
    num_tokens: int,
    counts: dict[str, int],
    fresh: bool,
    gates_run: bool,
    recomputed_rows: int = 0,
    grid: tuple[int, int] | None = None,
    attention_cost: tuple[int, int] | None = None,
) -> dict[str, int]:
    """One stream of one eventful block (`grid`: see `dense_attention_macs`;
    `attention_cost`: the attention's own count, where its path made one).

    counts: tokens selected at each gate ("qkv", "proj", "mlp"); fresh: the stream runs densely
    to fill its caches; gates_run: the gates computed errors (false when the whole batch is
    fresh: then they only copy the input into the reference); recomputed_rows: rows the full
    or exact level recomputed beyond the selection.
    """
    n, d = num_tokens, block.dim
    s_qkv = counts["qkv"]
    linear = (
        linear_macs(s_qkv, block.qkv)
        + linear_macs(counts["proj"], block.proj)
        + linear_macs(counts["mlp"], block.fc1)
        + linear_macs(counts["mlp"], block.fc2)
    )
    adds = 2 * n * d
    # Every gate computes an error and its norm for every token of every stream.
    gates = 3 * 2 * n * d if gates_run else 0
    if attention_cost is not None:
        attention = attention_cost[0]
        adds += attention_cost[1]
    elif block.kv_pool > 1:  # the tokenwise level, keys and values pooled
        attention, pool_adds = pooled_attention_macs(n, d, grid, block.kv_pool)
        adds += pool_adds
    elif fresh or block.level == "tokenwise":
        attention, bias_adds = dense_attention_macs(block, n, grid)
        adds += bias_adds
    elif block.level == "exact" and exact_update_is_dense(s_qkv, n):
        attention = 2 * n * n * d
    elif block.level == "exact":
        # Every row swaps old for new contributions of the s changed keys (logits and values,
        # old and new: 4 n s d); the s changed queries' rows, and any underflowed rows, are
        # recomputed over all keys (2 n d each). Running sums: rescale, two accumulations.
        attention = 4 * n * s_qkv * d + 2 * (s_qkv + recomputed_rows) * n * d
        adds += 3 * n * d + 3 * n * block.heads
    elif block.level == "qk":
        attention = 2 * s_qkv * n * d + n * n * d
    else:
        # Full: the changed keys' attention columns need their new logits (n s d) and each
        # row's log-sum-exp, kept as running sums like the exact level's (old logits n s d,
        # changed and underflowed rows over all keys) or, from s = n / 3 on, recomputed from
        # all logits (n n d); then two accumulations into the attention-value product.
        if full_update_is_dense(s_qkv, n):
            attention = n * n * d + 2 * n * s_qkv * d
        else:
            attention = 2 * n * s_qkv * d + (s_qkv + recomputed_rows) * n * d + 2 * n * s_qkv * d
            adds += 3 * n * block.heads
        gates += s_qkv * d + block.heads * n * s_qkv
        adds += 2 * n * d
    return {"linear": linear, "attention": attention, "adds": adds, "gates": gates}


def count_step(blocks: nn.ModuleList, trace: StepTrace) -> OpCount:
    """Op counts of a traced step of the eventful blocks `blocks`."""
    batch = trace.blocks[0]["qkv"].batch_size
    per_stream = [dict.fromkeys(CATEGORIES, 0) for _ in range(batch)]
    dense = [0] * batch
    escalated = [0] * batch
    gates_run = len(trace.fresh_streams) < batch
    head_dense = [trace.head_dense_macs // batch] * batch
    for stream in range(batch):
        per_stream[stream]["head"] = trace.head_macs // batch
        dense[stream] += head_dense[stream]
        if trace.reduction_macs:
            per_stream[stream]["gates"] += trace.reduction_macs[stream]
    steps = zip(
        blocks,
        trace.blocks,
        trace.escalated,
        trace.recomputed_rows,
        trace.attention_costs,
        strict=True,
    )
    for block, selections, added, recomputed_rows, attention_costs in steps:
        block_dense = sum(dense_block_macs(block, trace.num_tokens, trace.grid).values())
        for stream in range(batch):
            counts = {gate: selection.counts[stream] for gate, selection in selections.items()}
            # Every token selected rebuilds the attention caches as a dense step does (block.py).
            fresh = stream in trace.fresh_streams or selections["qkv"].everything
            recomputed = recomputed_rows[stream]
            cost = None if attention_costs is None else attention_costs[stream]
            macs = eventful_block_macs(
                block, trace.num_tokens, counts, fresh, gates_run, recomputed, trace.grid, cost
            )
            for name, value in macs.items():
                per_stream[stream][name] += value
            dense[stream] += block_dense
            if any(added[gate][stream] for gate in counts):
                own = {gate: count - added[gate][stream] for gate, count in counts.items()}
                without = eventful_block_macs(
                    block, trace.num_tokens, own, fresh, gates_run, recomputed, trace.grid, cost
                )
                escalated[stream] += sum(macs.values()) - sum(without.values())
    return OpCount(per_stream, dense, escalated, head_dense)


def steady_topk_macs(blocks: nn.ModuleList, num_tokens: int, k: int) -> int:
    """Multiply-accumulates of one stream's step after the first under `TopK(k)`."""
    counts = dict.fromkeys(("qkv", "proj", "mlp"), k)
    return sum(
        sum(eventful_block_macs(block, num_tokens, counts, False, True).values())
        for block in blocks
    )


def dense_macs(blocks: nn.ModuleList, num_tokens: int, grid: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one stream's dense step (`grid`: see `dense_attention_macs`)."""
    return sum(sum(dense_block_macs(block, num_tokens, grid).values()) for block in blocks)


def topk_for_op_ratio(
    blocks: nn.ModuleList, num_tokens: int, ratio: float, frames: int | None = None
) -> int:
    """The largest k for which `TopK(k)` runs on at most 1 / ratio of the dense ops.

    Without `frames`, the ratio holds for every step after the first; with it, on average over
    that many frames, the first of which runs densely. Raises ValueError when no k reaches it.
    """
    dense = dense_macs(blocks, num_tokens)
    budget = dense / ratio
    if frames is not None:
        if frames < 2 or frames <= ratio:
            raise ValueError(f"an average op ratio of {ratio} cannot be reached in {frames} frames")
        budget = (frames * dense / ratio - dense) / (frames - 1)
    k = largest_topk_within(blocks, num_tokens, budget)
    if k == 0:
        raise ValueError(
            f"an op ratio of {ratio} is out of reach: even TopK(1) costs more than that"
        )
    return k


def largest_topk_within(blocks: nn.ModuleList, num_tokens: int, macs: float) -> int:
    """The largest k (at most `num_tokens`) whose steady `TopK(k)` step costs one stream at
    most `macs` multiply-accumulates (`steady_topk_macs`); 0 when even k = 1 costs more."""
    low, high = 0, num_tokens
    while low < high:
        middle = (low + high + 1) // 2
        if steady_topk_macs(blocks, num_tokens, middle) <= macs:
            low = middle
        else:
            high = middle - 1
    return low
