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

Every level also runs over attention groups: windows (padded to whole windows) and a global
grid with an additive bias keep their caches per group (`GroupLayout`), and an update touches
only the groups that hold a changed token.
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
    full_update_cost,
    query_key_product,
    query_key_update_cost,
    recompute_attention_rows,
    recompute_full_attention,
    update_exact_attention,
    update_exact_attention_batch,
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
        if self.partitioned:  # caches per attention group
            layout = self.layout(grid, "cpu")
            groups, length = batch * layout.groups, layout.length
            square = (groups, self.heads, length, length)
            per_head = (groups, self.heads, length, self.dim // self.heads)
        if self.level == "qk":
            specs["query_key_product"] = (square, square_dtype)
        if self.level == "full":
            # Key-major: (B, H, N keys, N queries); see update_attention_value_product.
            specs["attention_reference"] = (square, square_dtype)
            specs["attention_value_product"] = (per_head, dtype)
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
        # The exact level updates a batch whose streams all changed equally many tokens (top-k)
        # in one call per operation; other selections go stream by stream.
        batch_index = None
        if self.level == "exact" and not self.partitioned and not recomputing:
            batch_index = _equal_counts(qkv_selection)
        if batch_index is not None:
            old_keys_values = self._keys_values_batch(state["qkv"], batch_index)
        elif self.level in ("full", "exact") and len(recomputing) < batch:
            old_keys_values = self._keys_values_at(state["qkv"], qkv_selection, recomputing)
        write_rows(state["qkv"], qkv_selection, qkv_rows)

        recomputed = [0] * batch
        attention_costs = None  # per stream, where the attention path counts its own cost
        if batch_index is not None:
            attended = self._attend_exact_batch(state, batch_index, old_keys_values, recomputed)
            attended = attended.transpose(1, 2).reshape(batch, num_tokens, dim)
        elif not self.partitioned:
            attended = self._attend(state, qkv_selection, recomputing, old_keys_values, recomputed)
            attended = attended.transpose(1, 2).reshape(batch, num_tokens, dim)
        elif self.level == "tokenwise":
            attended = self._attend_partitioned(state["qkv"], grid)
        else:
            attention_costs = []
            attended = self._attend_grouped(
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

    def _attend_grouped(
        self, state, selection, fresh_streams, old_keys_values, recomputed, grid, costs
    ) -> Tensor:
        """Attention over attention groups (windows, or a global grid with a bias) at the qk,
        full or exact level: output (B, N, D). Each group keeps its own caches; a stream's
        changed tokens update the groups they fall in, each with its positions' bias. Appends
        each stream's attention (multiply-accumulates, adds) to `costs`."""
        batch = selection.batch_size
        layout, q, k, v = self._grouped_heads(state["qkv"], grid)
        groups, length = layout.groups, layout.length
        sides = None if self.bias is None else layout.sides
        for stream, index in enumerate(selection.per_stream):
            span = slice(stream * groups, (stream + 1) * groups)
            if stream in fresh_streams:
                bias = None if self.bias is None else self.bias(q[span], layout.sides)
                self._recompute_groups(state, span, q[span], k[span], v[span], bias)
                macs, adds = dense_attention_cost(length, self.dim, self.heads, sides)
                costs.append((groups * macs, groups * adds))
                continue
            slots = layout.slot.index_select(0, index)
            group_of, position = slots // length, slots % length
            old = None if old_keys_values is None else old_keys_values[stream]
            total_macs, total_adds = 0, 0
            for group in group_of.unique().tolist():
                member = (group_of == group).nonzero().squeeze(1)
                at = stream * groups + group
                bias_for = None
                if self.bias is not None:
                    bias_for = partial(self.bias.between, q[at], layout.sides)
                old_group = None
                if old is not None:
                    old_group = (old[0].index_select(1, member), old[1].index_select(1, member))
                changed = position.index_select(0, member)
                if self.level == "full":
                    # A padded slot never changes, so no gate selects it; but its attention
                    # column moves with the row's normalisation, and the full level updates
                    # only the columns it is given. Constant keys and values: old = new.
                    padding = layout.padding[group]
                    if padding.numel():
                        changed = torch.cat([changed, padding])
                        old_group = tuple(
                            torch.cat([old_part, part[at].index_select(1, padding)], dim=1)
                            for old_part, part in zip(old_group, (k, v), strict=True)
                        )
                macs, adds, underflowed = self._update_group(
                    state, at, (q[at], k[at], v[at]), old_group, changed, bias_for, sides
                )
                recomputed[stream] += underflowed
                total_macs, total_adds = total_macs + macs, total_adds + adds
            if self.level == "qk":  # every group's softmax of its cached logits, times V
                total_macs += groups * length * length * self.dim
            costs.append((total_macs, total_adds))
        if self.level == "exact":
            out = state["attention_numerator"]
            if len(fresh_streams) < batch:
                out = out / state["attention_denominator"].unsqueeze(-1)
        elif self.level == "qk":
            out = torch.matmul(state["query_key_product"].softmax(dim=-1, dtype=v.dtype), v)
        else:
            out = state["attention_value_product"]
        out = out.transpose(1, 2).reshape(batch * groups, length, self.dim)
        return self._ungrouped(out, layout, batch)

    def _recompute_groups(self, state, span, q, k, v, bias) -> None:
        """Rebuild the caches of the groups `span` (G, ...) from q, k, v (G, H, L, dh)."""
        if self.level == "exact":
            output, logsumexp = attention_with_logsumexp(q, k, v, bias)
            state["attention_numerator"][span].copy_(output)
            state["attention_denominator"][span].fill_(1.0)
            state["attention_shift"][span].copy_(logsumexp)
        elif self.level == "qk":
            logits = state["query_key_product"][span]
            logits.copy_(query_key_product(q, k, bias).to(logits.dtype))
        else:
            names = ("attention_value_product", "attention_reference")
            sums = ("attention_denominator", "attention_shift")
            recompute_full_attention(
                *(state[name][span] for name in (*names, *sums)), q, k, v, bias
            )

    def _update_group(self, state, at, heads, old, changed, bias_for, sides):
        """Update the caches of group `at` for its `changed` positions; returns its
        (multiply-accumulates, adds, underflowed rows recomputed)."""
        length = heads[0].shape[1]
        count = changed.numel()
        if self.level == "qk":
            update_query_key_product(state["query_key_product"][at], *heads[:2], changed, bias_for)
            return (*query_key_update_cost(length, count, self.dim, self.heads, sides), 0)
        if self.level == "exact":
            names = ("attention_numerator", "attention_denominator", "attention_shift")
            underflowed = update_exact_attention(
                *(state[name][at] for name in names), *heads, *old, changed, bias_for
            )
            cost = exact_update_cost(length, count, underflowed, self.dim, self.heads, sides)
            return (*cost, underflowed)
        names = (
            "attention_value_product",
            "attention_reference",
            "attention_denominator",
            "attention_shift",
        )
        underflowed = update_full_attention(
            *(state[name][at] for name in names), *heads, *old, changed, bias_for
        )
        cost = full_update_cost(length, count, underflowed, self.dim, self.heads, sides)
        return (*cost, underflowed)

    def _keys_values_batch(self, qkv: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """The buffered keys and values (B, H, s, dh) at the tokens index (B, s), read before
        they are overwritten."""
        _, k, v = self._split_heads(qkv)
        by_element = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        return k.gather(2, by_element), v.gather(2, by_element)

    def _attend_exact_batch(self, state, index, old_keys_values, recomputed) -> Tensor:
        """Attention output (B, H, N, dh) of the exact level, every stream updated at once."""
        q, k, v = self._split_heads(state["qkv"])
        numerator = state["attention_numerator"]
        denominator = state["attention_denominator"]
        counts = update_exact_attention_batch(
            numerator, denominator, state["attention_shift"], q, k, v, *old_keys_values, index
        )
        recomputed[:] = counts
        return numerator / denominator.unsqueeze(-1)

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


def _equal_counts(selection: Selection) -> Tensor | None:
    """The selection's token indices as one (B, s) tensor when every stream selected the same
    number of tokens (and some), else None."""
    counts = selection.counts
    if selection.everything or counts[0] == 0 or any(count != counts[0] for count in counts):
        return None
    return torch.stack(selection.per_stream)
