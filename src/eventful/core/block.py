"""The eventful transformer block: gates around every token-wise op, cached attention products.

Levels (DESIGN.md):
- "tokenwise": token gates and buffers around the qkv projection, the output projection and
  the MLP; attention runs densely over the buffered q, k, v.
- "qk": as tokenwise, and the query-key product is cached and updated by rows and columns.
- "full": the paper's full level: the attention-value product is cached and updated by
  deltas of the changed keys' attention columns. Those columns are computed from fresh logits
  and each row's log-sum-exp, kept as running sums: no N x N softmax, and only the N x N
  attention reference is cached (no query-key product).
- "exact": token gates as tokenwise; attention kept unnormalised per query row (running sums of
  exp(logit) v and exp(logit)) and updated exactly for the changed keys and queries: no N x N
  cache and no N x N softmax (DESIGN.md, "Beyond the paper").
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful.core.attention import (
    attention_with_logsumexp,
    dense_attention_cost,
    exact_update_cost,
    recompute_attention_rows,
    recompute_full_attention,
    update_exact_attention,
    update_full_attention,
    update_query_key_product,
)
from eventful.core.description import BlockDescription
from eventful.core.escalation import Escalation
from eventful.core.gates import GateStep, token_gate, write_rows
from eventful.core.ops import StepTrace
from eventful.core.partition import GroupLayout, group_layout
from eventful.core.policies import Policy
from eventful.core.selection import Selection

LEVELS = ("tokenwise", "qk", "full", "exact")


def _scaled_linear(linear: nn.Linear, scale: Tensor) -> nn.Linear:
    """A copy of `linear` whose outputs are multiplied by `scale` (out_features,)."""
    scaled = copy.deepcopy(linear)
    with torch.no_grad():
        scaled.weight.mul_(scale.unsqueeze(1))
        if scaled.bias is not None:
            scaled.bias.mul_(scale)
    return scaled


def _ones_if_none(scale: Tensor | None, dim: int) -> Tensor:
    return torch.ones(dim) if scale is None else scale.detach()


class EventfulBlock(nn.Module):
    """An eventful copy of a pre-norm block (`BlockDescription`); tokens (B, N, D) -> (B, N, D)
    with state.

    Construction folds the attention scale into the q rows of the qkv projection and each
    layer scale into the projection before it, so the eventful block does no extra work for
    them. The described modules are copied, not modified.
    """

    def __init__(
        self,
        block: BlockDescription,
        level: str,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if cache_dtype is not None and (
            not isinstance(cache_dtype, torch.dtype) or not cache_dtype.is_floating_point
        ):
            raise ValueError(
                f"cache_dtype must be a floating-point torch dtype such as torch.float16, "
                f"got {cache_dtype!r}"
            )
        block.validate()
        self.cache_dtype = cache_dtype
        dim = block.dim
        self.level = level
        self.dim = dim
        self.heads = block.attention.heads
        query_scale = torch.ones(3 * dim)
        query_scale[:dim] = block.attention.scale
        self.norm1 = copy.deepcopy(block.norm1)
        self.qkv = _scaled_linear(block.qkv, query_scale)
        self.proj = _scaled_linear(block.proj, _ones_if_none(block.layer_scale1, dim))
        self.norm2 = copy.deepcopy(block.norm2)
        self.fc1 = copy.deepcopy(block.fc1)
        self.activation = copy.deepcopy(block.activation)
        self.fc2 = _scaled_linear(block.fc2, _ones_if_none(block.layer_scale2, dim))
        attention = block.attention
        partitioned = attention.window is not None or attention.bias is not None
        if level not in ("tokenwise", "exact") and partitioned:
            kind = "windowed attention" if attention.window is not None else "an attention bias"
            raise ValueError(
                f"level {level!r} does not support {kind} yet; use level 'exact' or "
                "'tokenwise' for this block"
            )
        self.window = attention.window
        # The bias takes q before the scale, which the qkv projection now applies.
        self.bias = None if attention.bias is None else attention.bias.scaled(1 / attention.scale)
        self.partitioned = partitioned
        self._layouts: dict[tuple, GroupLayout] = {}

    def layout(self, grid: tuple[int, int], device: torch.device) -> GroupLayout:
        """The attention groups of a windowed or biased block on a rows x cols grid (cached)."""
        key = (grid, torch.device(device))
        if key not in self._layouts:
            self._layouts[key] = group_layout(self.window, grid, device)
        return self._layouts[key]

    def state_specs(
        self,
        batch: int,
        num_tokens: int,
        dtype: torch.dtype,
        grid: tuple[int, int] | None = None,
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each of this block's state tensors for a batch of streams.

        The N x N attention caches of the "qk" and "full" levels take `cache_dtype` when set;
        the running log-sum-exp sums of "full" and "exact" keep the step's dtype. A windowed or
        biased exact block keeps its sums per attention group, (B * groups, H, L, dh).
        """
        tokens = (batch, num_tokens, self.dim)
        square_dtype = self.cache_dtype or dtype
        specs = {
            "qkv_reference": (tokens, dtype),
            "qkv": ((batch, num_tokens, 3 * self.dim), dtype),
            "proj_reference": (tokens, dtype),
            "proj": (tokens, dtype),
            "mlp_reference": (tokens, dtype),
            "mlp": (tokens, dtype),
            # Each gate's scale: the mean token norm of its input at the last dense step.
            "qkv_scale": ((batch,), dtype),
            "proj_scale": ((batch,), dtype),
            "mlp_scale": ((batch,), dtype),
        }
        square = (batch, self.heads, num_tokens, num_tokens)
        per_head = (batch, self.heads, num_tokens, self.dim // self.heads)
        if self.level == "qk":
            specs["query_key_product"] = (square, square_dtype)
        if self.level == "full":
            # Key-major: (B, H, N keys, N queries); see update_attention_value_product.
            specs["attention_reference"] = (square, square_dtype)
            specs["attention_value_product"] = (per_head, dtype)
        if self.level == "exact" and self.partitioned:
            layout = self.layout(grid, "cpu")
            per_head = (batch * layout.groups, self.heads, layout.length, self.dim // self.heads)
        if self.level == "exact":
            specs["attention_numerator"] = (per_head, dtype)
        if self.level in ("full", "exact"):
            specs["attention_denominator"] = (per_head[:3], dtype)
            specs["attention_shift"] = (per_head[:3], dtype)
        return specs

    def forward(
        self,
        x: Tensor,
        state: dict[str, Tensor],
        policy: Policy,
        fresh_streams: list[int],
        trace: StepTrace | None = None,
        escalation: Escalation | None = None,
        grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """One step; `grid`, the patch grid (rows, columns), is needed by windows and biases,
        which take the tokens as that grid (no prefix tokens)."""
        batch, num_tokens, dim = x.shape
        measure = trace is not None

        def gate(name: str, current: Tensor) -> GateStep:
            return token_gate(
                current,
                state[f"{name}_reference"],
                state[f"{name}_scale"],
                policy,
                fresh_streams,
                escalation,
                measure,
            )

        qkv_gate = gate("qkv", x)
        qkv_selection = qkv_gate.selection
        qkv_rows = self.qkv(self.norm1(qkv_gate.rows))
        # Every token selected: the attention caches are rebuilt as on a dense step, which costs
        # less than updating them for every key (and gives the same values).
        recomputing = list(range(batch)) if qkv_selection.everything else fresh_streams
        old_keys_values = None
        if self.level in ("full", "exact") and len(recomputing) < batch:
            old_keys_values = self._keys_values_at(state["qkv"], qkv_selection, recomputing)
        write_rows(state["qkv"], qkv_selection, qkv_rows)

        recomputed = [0] * batch
        attention_costs = None  # per stream, where the attention path counts its own cost
        if not self.partitioned:
            attended = self._attend(state, qkv_selection, recomputing, old_keys_values, recomputed)
            attended = attended.transpose(1, 2).reshape(batch, num_tokens, dim)
        elif self.level == "tokenwise":
            attended = self._attend_partitioned(state["qkv"], grid)
        else:
            attention_costs = []
            attended = self._attend_exact_grouped(
                state,
                qkv_selection,
                recomputing,
                old_keys_values,
                recomputed,
                grid,
                attention_costs,
            )

        proj_gate = gate("proj", attended)
        write_rows(state["proj"], proj_gate.selection, self.proj(proj_gate.rows))
        y = x + state["proj"]

        mlp_gate = gate("mlp", y)
        hidden = self.activation(self.fc1(self.norm2(mlp_gate.rows)))
        write_rows(state["mlp"], mlp_gate.selection, self.fc2(hidden))
        if trace is not None:
            gates = {"qkv": qkv_gate, "proj": proj_gate, "mlp": mlp_gate}
            trace.record_block(gates, recomputed, attention_costs)
        return y + state["mlp"]

    def _split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Views q, k, v (B, H, N, dh) of the qkv buffer (B, N, 3 D)."""
        batch, num_tokens, _ = qkv.shape
        heads = qkv.view(batch, num_tokens, 3, self.heads, self.dim // self.heads)
        q, k, v = heads.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _grouped(self, tokens: Tensor, layout: GroupLayout, fill: Tensor | None) -> Tensor:
        """Tokens (B, N, X) -> their attention groups (B * groups, L, X); slots without a token
        (a window's padding) hold `fill` (X,), or zeros."""
        batch, _, channels = tokens.shape
        if layout.groups == 1:  # global: the slots are the tokens, in order
            return tokens.view(batch * layout.groups, layout.length, channels)
        grouped = tokens.new_zeros(batch, layout.groups * layout.length, channels)
        if fill is not None:
            grouped.copy_(fill.expand_as(grouped))
        grouped.index_copy_(1, layout.slot, tokens)
        return grouped.view(batch * layout.groups, layout.length, channels)

    def _ungrouped(self, grouped: Tensor, layout: GroupLayout, batch: int) -> Tensor:
        """(B * groups, L, X) -> the tokens' rows (B, N, X)."""
        flat = grouped.reshape(batch, layout.groups * layout.length, grouped.shape[-1])
        if layout.groups == 1:
            return flat
        return flat.index_select(1, layout.slot)

    def _grouped_heads(self, qkv: Tensor, grid: tuple[int, int]) -> tuple:
        """The layout and q, k, v (B * groups, H, L, dh) of the buffered qkv (B, N, 3 D).

        A padded slot's input is zero (as ViTDet pads after the first norm), so its q, k and v
        are the qkv projection's bias: the same on every step, never selected by a gate.
        """
        layout = self.layout(grid, qkv.device)
        q, k, v = self._split_heads(self._grouped(qkv, layout, self.qkv.bias))
        return layout, q, k, v

    def _attend_partitioned(self, qkv: Tensor, grid: tuple[int, int]) -> Tensor:
        """Attention output (B, N, D) over the buffered qkv (B, N, 3 D) of a rows x cols grid,
        within windows and/or with the bias: all queries, as the tokenwise level does."""
        layout, q, k, v = self._grouped_heads(qkv, grid)
        bias = None if self.bias is None else self.bias(q, layout.sides).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        out = out.transpose(1, 2).reshape(q.shape[0], layout.length, self.dim)
        return self._ungrouped(out, layout, qkv.shape[0])

    def _attend_exact_grouped(
        self, state, selection, fresh_streams, old_keys_values, recomputed, grid, costs
    ) -> Tensor:
        """The exact level over attention groups (windows, or a global grid with a bias):
        output (B, N, D). Each group keeps its own running sums; a stream's changed tokens
        update the groups they fall in, each with its own positions' bias. Appends each
        stream's attention (multiply-accumulates, adds) to `costs`."""
        batch = selection.batch_size
        layout, q, k, v = self._grouped_heads(state["qkv"], grid)
        numerator = state["attention_numerator"]
        denominator = state["attention_denominator"]
        shift = state["attention_shift"]
        groups, length = layout.groups, layout.length
        sides = None if self.bias is None else layout.sides
        for stream, index in enumerate(selection.per_stream):
            streams_groups = slice(stream * groups, (stream + 1) * groups)
            sums = (numerator[streams_groups], denominator[streams_groups], shift[streams_groups])
            heads = (q[streams_groups], k[streams_groups], v[streams_groups])
            if stream in fresh_streams:
                bias = None if self.bias is None else self.bias(heads[0], layout.sides)
                output, logsumexp = attention_with_logsumexp(*heads, bias)
                sums[0].copy_(output)
                sums[1].fill_(1.0)
                sums[2].copy_(logsumexp)
                macs, adds = dense_attention_cost(length, self.dim, self.heads, sides)
                costs.append((groups * macs, groups * adds))
                continue
            slots = layout.slot.index_select(0, index)
            group_of, position = slots // length, slots % length
            old_keys, old_values = old_keys_values[stream]
            stream_cost = [0, 0]
            for group in group_of.unique().tolist():
                member = (group_of == group).nonzero().squeeze(1)
                group_heads = tuple(part[group] for part in heads)
                bias_for = None
                if self.bias is not None:
                    bias_for = partial(self.bias.between, group_heads[0], layout.sides)
                underflowed = update_exact_attention(
                    *(part[group] for part in sums),
                    *group_heads,
                    old_keys.index_select(1, member),
                    old_values.index_select(1, member),
                    position.index_select(0, member),
                    bias_for,
                )
                recomputed[stream] += underflowed
                cost = exact_update_cost(
                    length, member.numel(), underflowed, self.dim, self.heads, sides
                )
                stream_cost = [stream_cost[0] + cost[0], stream_cost[1] + cost[1]]
            costs.append((stream_cost[0], stream_cost[1]))
        out = numerator if len(fresh_streams) == batch else numerator / denominator.unsqueeze(-1)
        out = out.transpose(1, 2).reshape(batch * groups, length, self.dim)
        return self._ungrouped(out, layout, batch)

    def _keys_values_at(
        self, qkv: Tensor, selection: Selection, fresh_streams: list[int]
    ) -> list[tuple[Tensor, Tensor] | None]:
        """Per stream, the buffered keys and values (H, s, dh) at the selected tokens, read
        before they are overwritten."""
        _, k, v = self._split_heads(qkv)
        old = []
        for stream, index in enumerate(selection.per_stream):
            if stream in fresh_streams:
                old.append(None)
                continue
            old.append((k[stream].index_select(1, index), v[stream].index_select(1, index)))
        return old

    def _attend(
        self,
        state: dict[str, Tensor],
        selection: Selection,
        fresh_streams: list[int],
        old_keys_values: list[tuple[Tensor, Tensor] | None] | None,
        recomputed: list[int],
    ) -> Tensor:
        """Attention output (B, H, N, dh) over the buffered q, k, v, at this block's level.

        `recomputed[b]` receives the rows the full or exact level recomputed beyond the
        selection.
        """
        q, k, v = self._split_heads(state["qkv"])
        if self.level == "tokenwise":
            return F.scaled_dot_product_attention(q, k, v, scale=1.0)
        if self.level == "exact":
            return self._attend_exact(
                state, q, k, v, selection, fresh_streams, old_keys_values, recomputed
            )
        if self.level == "full":
            return self._attend_full(
                state, q, k, v, selection, fresh_streams, old_keys_values, recomputed
            )

        logits = state["query_key_product"]
        for stream, index in enumerate(selection.per_stream):
            if stream in fresh_streams:
                logits[stream].copy_(torch.matmul(q[stream], k[stream].transpose(1, 2)))
            else:
                update_query_key_product(logits[stream], q[stream], k[stream], index)
        return torch.matmul(logits.softmax(dim=-1, dtype=v.dtype), v)

    def _attend_full(
        self, state, q, k, v, selection, fresh_streams, old_keys_values, recomputed
    ) -> Tensor:
        """Attention output (B, H, N, dh): the cached attention-value product, updated."""
        product = state["attention_value_product"]
        names = ("attention_reference", "attention_denominator", "attention_shift")
        for stream, index in enumerate(selection.per_stream):
            sums = (product[stream], *(state[name][stream] for name in names))
            heads = (q[stream], k[stream], v[stream])
            if stream in fresh_streams:
                recompute_full_attention(*sums, *heads)
            else:
                old_keys, old_values = old_keys_values[stream]
                recomputed[stream] = update_full_attention(
                    *sums, *heads, old_keys, old_values, index
                )
        return product

    def _attend_exact(
        self, state, q, k, v, selection, fresh_streams, old_keys_values, recomputed
    ) -> Tensor:
        """Attention output (B, H, N, dh) from the running sums of the exact level."""
        numerator = state["attention_numerator"]
        denominator = state["attention_denominator"]
        shift = state["attention_shift"]
        for stream, index in enumerate(selection.per_stream):
            sums = (numerator[stream], denominator[stream], shift[stream])
            heads = (q[stream], k[stream], v[stream])
            if stream in fresh_streams:
                recompute_attention_rows(*sums, *heads, index)
            else:
                old_keys, old_values = old_keys_values[stream]
                recomputed[stream] = update_exact_attention(
                    *sums, *heads, old_keys, old_values, index
                )
        if len(fresh_streams) == len(selection.per_stream):
            return numerator  # every row just recomputed: the denominators are 1
        return numerator / denominator.unsqueeze(-1)
