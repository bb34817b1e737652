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
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from eventful.core import kernels
from eventful.core.attention import (
    UNDERFLOW,
    BiasFor,
    Changes,
    at_positions,
    bfloat16_attention_kernel,
    dense_attention_cost,
    exact_dense_from,
    exact_update_cost,
    exact_update_is_dense,
    full_update_cost,
    full_update_is_dense,
    query_key_product,
    query_key_update_cost,
    recompute_exact_groups,
    recompute_full_attention,
    softmax_attention,
    update_exact_groups,
    update_exact_sequences,
    update_full_groups,
    update_query_key_groups,
)
from eventful.core.description import BlockDescription
from eventful.core.escalation import Escalation
from eventful.core.fingerprint import ModuleWatch, tensor_key
from eventful.core.gates import (
    GateStep,
    add_rows,
    fused_layer_norm,
    lean_gate,
    lean_gates_apply,
    token_gate,
    write_rows,
)
from eventful.core.kv_pooling import pool_keys_values
from eventful.core.ops import StepTrace
from eventful.core.packed_linear import PackedLinear, current_compute_dtype, mlp_forward
from eventful.core.partition import GroupLayout, group_layout, whole_sequence_layout
from eventful.core.policies import Policy
from eventful.core.selection import Selection
from eventful.core.state import StreamState

LEVELS = ("tokenwise", "qk", "full", "exact")

# The lean step (`EventfulBlock._lean_forward`) where it applies; False runs every step through
# the general one (tests compare the two).
LEAN_STEPS = True

# The lean step in one kernel call (`EventfulBlock._one_call_step`) where it applies; False runs
# it from Python (tests compare the two).
FUSED_BLOCK_STEPS = True

# Where every block of a step would run in one kernel call, all of them in one call
# (`steps_in_one_call`); False calls the kernel once per block (tests compare the two).
BLOCKS_IN_ONE_CALL = True


def _scaled_linear(linear: nn.Linear, scale: Tensor, precision: str) -> PackedLinear:
    """A copy of `linear` at `precision` whose outputs are multiplied by `scale`
    (out_features,)."""
    scaled = PackedLinear.from_linear(linear, precision=precision)
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
    them. The described modules are copied, not modified. `precision` is that of the linear
    layers (`eventful.core.precision`), which round their weights after the folding.
    """

    def __init__(
        self,
        block: BlockDescription,
        level: str,
        cache_dtype: torch.dtype | None = None,
        precision: str = "fp32",
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
        self.qkv = _scaled_linear(block.qkv, query_scale, precision)
        self.proj = _scaled_linear(block.proj, _ones_if_none(block.layer_scale1, dim), precision)
        self.norm2 = copy.deepcopy(block.norm2)
        activation = copy.deepcopy(block.activation)
        self.fc1 = PackedLinear.from_linear(block.fc1, activation, precision)
        self.fc2 = _scaled_linear(block.fc2, _ones_if_none(block.layer_scale2, dim), precision)
        attention = block.attention
        self.window = attention.window
        # The bias takes q before the scale, which the qkv projection now applies.
        self.bias = None if attention.bias is None else attention.bias.scaled(1 / attention.scale)
        self.partitioned = attention.partitioned
        # At precision "bf16", attention over every row (the tokenwise level, and a recompute of
        # every row) runs in bfloat16 too: PyTorch's fused attention there measured 1.8-2.5x
        # faster than the float32 kernel at ViT-S/14 @ 224 and ViT-B/16 @ 384 (Intel Xeon with
        # AMX, 2 threads). The caches keep their float32.
        self.attention_dtype = torch.bfloat16 if precision == "bf16" else None
        self._layouts: dict[tuple, GroupLayout] = {}
        # The linear layers' operands of the last one-call block step, and what they hold for
        # (`_block_step_weights`).
        self._step_weights: tuple[tuple, list | None, tuple | None] | None = None
        # How often `clear_weight_caches` ran: what streams' kept operands (`KeptOperands`) of
        # the blocks in one call check for it.
        self.weight_caches_cleared = 0
        # Baselines, set by EventfulViT: the STGT gates (change since the previous step), and
        # the K/V pooling factor of the tokenwise level's attention.
        self.previous_frame_gates = False
        self.kv_pool = 1

    def layout(
        self, grid: tuple[int, int] | None, num_tokens: int, device: torch.device
    ) -> GroupLayout:
        """The attention groups of one stream (cached): windows, or a global grid with a bias,
        on a rows x cols patch grid; else all `num_tokens` tokens, prefix tokens included, as
        one group."""
        key = (grid if self.partitioned else num_tokens, torch.device(device))
        if key not in self._layouts:
            if self.partitioned:
                self._layouts[key] = group_layout(self.window, grid, device)
            else:
                self._layouts[key] = whole_sequence_layout(num_tokens, device)
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
        the running log-sum-exp sums of "full" and "exact" keep the step's dtype. Every cache
        is kept per attention group (`layout`): (B * groups, H, L, ...).
        """
        tokens = (batch, num_tokens, self.dim)
        square_dtype = self.cache_dtype or dtype
        specs = {
            "qkv_reference": (tokens, dtype),
            "qkv": ((batch, num_tokens, 3 * self.dim), self._qkv_dtype(dtype)),
            "proj_reference": (tokens, dtype),
            "proj": (tokens, dtype),
            "mlp_reference": (tokens, dtype),
            "mlp": (tokens, dtype),
            # Each gate's scale: the mean token norm of its input at the last dense step.
            "qkv_scale": ((batch,), dtype),
            "proj_scale": ((batch,), dtype),
            "mlp_scale": ((batch,), dtype),
        }
        layout = self.layout(grid, num_tokens, "cpu")
        groups, length = batch * layout.groups, layout.length
        square = (groups, self.heads, length, length)
        per_head = (groups, self.heads, length, self.dim // self.heads)
        if self.level == "qk":
            specs["query_key_product"] = (square, square_dtype)
        if self.level == "full":
            # Key-major: (B * groups, H, L keys, L queries); see update_full_groups.
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
        batch, num_tokens, _ = x.shape
        lean = self._lean_step(x, state, policy, fresh_streams, escalation)
        if lean is not None:
            return self._lean_forward(x, state, lean, trace, grid)
        measure = trace is not None

        def gate(name: str, current: Tensor, norm: nn.Module | None = None) -> GateStep:
            return token_gate(
                current,
                state[f"{name}_reference"],
                state[f"{name}_scale"],
                policy,
                fresh_streams,
                escalation,
                measure,
                self.previous_frame_gates,
                norm,
            )

        qkv_gate = gate("qkv", x, self.norm1)
        qkv_rows = self.qkv(qkv_gate.rows)
        layout = self.layout(grid, num_tokens, x.device)
        recomputed, attention_costs = [0] * batch, None
        sequences = self._update_exact_sequences(state, qkv_rows, qkv_gate.selection)
        if self.level == "tokenwise":
            write_rows(state["qkv"], qkv_gate.selection, qkv_rows)
            attended = self._attend_every_row(state["qkv"], layout, grid, x.dtype)
        elif sequences is not None:
            attended, lost = sequences
            if measure:
                recomputed = lost.tolist()
        else:
            plan = self._plan(qkv_gate.selection, fresh_streams, layout)
            old_keys_values = [None] * len(plan.updates)  # the qk level needs none
            if self.level in ("full", "exact"):
                old_keys_values = self._keys_values_before(state["qkv"], layout, plan)
            write_rows(state["qkv"], qkv_gate.selection, qkv_rows)
            attended, recomputed = self._attend_cached(state, layout, plan, old_keys_values)
            if measure and self.partitioned:
                attention_costs = self._attention_costs(layout, plan, recomputed)
            recomputed = recomputed.view(batch, layout.groups).sum(dim=1).tolist()

        proj_gate = gate("proj", attended)
        y = add_rows(x, state["proj"], proj_gate.selection, self.proj(proj_gate.rows))

        mlp_gate = gate("mlp", y, self.norm2)
        mlp_rows = mlp_forward(self.fc1, self.fc2, mlp_gate.rows)  # fc1 with the activation
        if trace is not None:
            gates = {"qkv": qkv_gate, "proj": proj_gate, "mlp": mlp_gate}
            trace.record_block(gates, recomputed, attention_costs)
        return add_rows(y, state["mlp"], mlp_gate.selection, mlp_rows)

    def _lean_step(
        self,
        x: Tensor,
        state: dict[str, Tensor],
        policy: Policy,
        fresh_streams: list[int],
        escalation: Escalation | None,
    ) -> _LeanStep | None:
        """What this step's lean form (`_lean_forward`) needs, where it applies; else None. It
        applies to the common case: a policy that takes each stream's k < N tokens of largest
        L2 error, no fresh stream, no escalation, not the STGT gates, outside autograd,
        LayerNorms before attention and MLP, at the tokenwise level or at the exact level over
        each stream's whole sequence without a bias, on tensors the kernels take."""
        if (
            not LEAN_STEPS
            or escalation is not None
            or fresh_streams
            or self.previous_frame_gates
            or torch.is_grad_enabled()
            or policy.norm != 2
        ):
            return None
        num_tokens = x.shape[1]
        count = policy.largest_count(num_tokens)
        if count is None or count >= num_tokens:
            return None
        if self.level == "exact":
            if self.partitioned or self.bias is not None:
                return None
            if kernels.exact_attention_update() is None:
                return None
        elif self.level != "tokenwise":
            return None
        norm1, norm2 = fused_layer_norm(self.norm1, x), fused_layer_norm(self.norm2, x)
        # The tokenwise level's qkv buffer only takes rows (`write_rows`), in any dtype.
        kernel_state = [t for n, t in state.items() if n != "qkv" or self.level == "exact"]
        if norm1 is None or norm2 is None or not lean_gates_apply(x, *kernel_state):
            return None
        return _LeanStep(count, norm1, norm2)

    def _lean_forward(
        self,
        x: Tensor,
        state: dict[str, Tensor],
        lean: _LeanStep,
        trace: StepTrace | None,
        grid: tuple[int, int] | None,
    ) -> Tensor:
        """The step of `forward` where `_lean_step` applies, bit for bit, in some fifteen kernel
        calls: each gate without `token_gate`'s checks and branches (`lean_gate`), the linear
        layers straight to their kernel (`PackedLinear.rows_forward`), the exact level's
        attention in one call (or, at precision "bf16" from N / 5 changes on, its recompute of
        every row in bfloat16, as `_attend_cached` does it); or, where each linear layer runs
        one kernel call, in one call in all (`_one_call_step`)."""
        count, measure = lean.count, trace is not None
        fused = self._one_call_step(x, state, lean, trace)
        if fused is not None:
            return fused

        def gate(name: str, current: Tensor, norm=None) -> GateStep:
            reference, scale = state[f"{name}_reference"], state[f"{name}_scale"]
            return lean_gate(current, reference, scale, count, norm, measure)

        qkv_gate = gate("qkv", x, lean.norm1)
        qkv_rows = self.qkv.rows_forward(qkv_gate.rows).contiguous()
        flat = qkv_gate.selection.flat
        recomputed = [0] * x.shape[0]
        if self.level == "exact" and self._recomputes_in_attention_dtype(count, x.shape[1]):
            write_rows(state["qkv"], qkv_gate.selection, qkv_rows)
            sums = [state[name] for name in CACHES["exact"]]
            layout = self.layout(grid, x.shape[1], x.device)
            low = self._low_precision_heads(state["qkv"], layout)
            output = recompute_exact_groups(*sums, *low)
            attended = self._ungrouped(output.to(x.dtype), layout, x.shape[0])
        elif self.level == "exact":
            sums = [state[name] for name in CACHES["exact"]]
            attended, lost = update_exact_sequences(state["qkv"], qkv_rows, flat, *sums, self.heads)
            if measure:
                recomputed = lost.tolist()
        else:
            write_rows(state["qkv"], qkv_gate.selection, qkv_rows)
            layout = self.layout(grid, x.shape[1], x.device)
            attended = self._attend_every_row(state["qkv"], layout, grid, x.dtype)
        add = kernels.add_rows()
        proj_gate = gate("proj", attended)
        proj_rows = self.proj.rows_forward(proj_gate.rows).contiguous()
        y = add(x, state["proj"], proj_gate.selection.flat, proj_rows)
        mlp_gate = gate("mlp", y, lean.norm2)
        mlp_rows = mlp_forward(self.fc1, self.fc2, mlp_gate.rows, lean=True).contiguous()
        if trace is not None:
            trace.record_block({"qkv": qkv_gate, "proj": proj_gate, "mlp": mlp_gate}, recomputed)
        return add(y, state["mlp"], mlp_gate.selection.flat, mlp_rows)

    def _one_call_step(
        self, x: Tensor, state: dict[str, Tensor], lean: _LeanStep, trace: StepTrace | None
    ) -> Tensor | None:
        """`_lean_forward` in one call of the CPU kernel (`kernels.block_step`), where each
        linear layer runs the small-rows kernel on the step's rows (`_block_step_weights`): at
        the exact level, and at the tokenwise level over each stream's whole sequence without a
        bias or K/V pooling, on the engine's kernel (a float32 qkv buffer) or in bfloat16 (a
        buffer that holds it, `_qkv_dtype`). The same kernels in the same order, bit for bit,
        without the Python between them. None where it does not apply."""
        operands = self._one_call_operands(x, state, lean)
        if operands is None:
            return None
        tensors, (eps1, eps2) = operands.tensors, operands.eps
        hidden, count, heads, dense_from, bfloat16_attention = operands.integers
        out, lost, gates = kernels.block_step()(
            x,
            *tensors[:14],
            eps1,
            *tensors[14:16],
            eps2,
            *tensors[16:],
            hidden,
            count,
            heads,
            dense_from,
            UNDERFLOW,
            bool(bfloat16_attention),
            trace is not None,
        )
        if trace is not None:
            trace.record_block(_fused_gate_steps(gates, x.shape[1]), lost.tolist())
        return out

    def one_call_operands(
        self,
        x: Tensor,
        state: dict[str, Tensor],
        policy: Policy,
        escalation: Escalation | None,
    ) -> OneCallOperands | None:
        """This step's operands for `kernels.blocks_step`, where the block's step (no fresh
        stream) would run in one call (`_lean_step`, then `_one_call_step`) and no forward hook
        watches the block; else None. Only x's shape, dtype and device are read: every block's
        input has those of the first block's."""
        if _runs_forward_hooks(self):
            return None
        lean = self._lean_step(x, state, policy, [], escalation)
        return None if lean is None else self._one_call_operands(x, state, lean)

    def _one_call_operands(
        self, x: Tensor, state: dict[str, Tensor], lean: _LeanStep
    ) -> OneCallOperands | None:
        """The operands of `_one_call_step`, or None where it does not apply."""
        if self.level == "exact":
            sums = [state[name] for name in CACHES["exact"]]
        elif self._attends_every_row_in_one_call(state["qkv"]):
            sums = [None, None, None]
        else:
            return None
        weights = self._block_step_weights(x, lean, kernels.block_step())
        if weights is None:
            return None
        tensors = [
            *(state[name] for name in STEP_STATE),
            *sums,
            *(state[f"{name}_scale"] for name in GATES),
            *lean.norm1[:2],
            *lean.norm2[:2],
            *weights[:-1],
        ]
        low = int(self.attention_dtype == torch.bfloat16)
        integers = (weights[-1], lean.count, self.heads, exact_dense_from(x.shape[1]), low)
        return OneCallOperands(tensors, (lean.norm1[2], lean.norm2[2]), integers)

    def _recomputes_in_attention_dtype(self, count: int, num_tokens: int) -> bool:
        """Whether the exact level's step with `count` changed tokens of `num_tokens` recomputes
        every row in the attention dtype (precision "bf16"), as `_attend_cached` does, rather
        than in the float32 kernel (`update_exact_sequences`)."""
        return self.attention_dtype is not None and exact_update_is_dense(count, num_tokens)

    def _attends_every_row_in_one_call(self, qkv: Tensor) -> bool:
        """Whether `kernels.block_step` attends every row as `_attend_every_row` does: one group
        per stream, no bias, no K/V pooling, a contiguous qkv buffer, float32 with attention in
        float32 or bfloat16 holding the attention dtype."""
        if self.partitioned or self.bias is not None or self.kv_pool > 1:
            return False
        float_buffer = qkv.dtype == torch.float32 and self.attention_dtype is None
        rounded_buffer = qkv.dtype == self.attention_dtype == torch.bfloat16
        return (float_buffer or rounded_buffer) and qkv.is_contiguous()

    def _block_step_weights(self, x: Tensor, lean: _LeanStep, kernel) -> list | None:
        """The linear layers' operands of a block step in one call (`kernels.block_step`):
        per layer (qkv, proj, fc1, fc2) its weight as its kernel takes it, bias and panel scale
        (`PackedLinear.step_operands`), then fc1's width; None where the kernel or
        `FUSED_BLOCK_STEPS` is off, or a layer would not run one kernel call on the step's rows
        or has another activation than the kernel's (fc1 the exact GELU, the others none)."""
        if kernel is None or not FUSED_BLOCK_STEPS:
            return None
        rows = x.shape[0] * lean.count
        layers = (self.qkv, self.proj, self.fc1, self.fc2)
        # Kept while the rows, the compute dtype and the layers' weights and biases are the same:
        # asking the layers again at every step took about 5% of a small step. Where the
        # operands hold a rounded copy of a bias (oneDNN's bfloat16 layers), the biases' values
        # are part of the key too.
        key = (
            rows,
            current_compute_dtype(),
            *(tensor_key(layer.weight) for layer in layers),
            *(id(layer.bias) for layer in layers),
        )
        kept = self._step_weights
        if kept is not None and kept[0] == key:
            if kept[2] is None or kept[2] == _bias_keys(layers):
                return kept[1]
        found = [layer.step_operands(rows) for layer in layers]
        activations = ("none", "none", "gelu", "none")
        weights, bias_keys = None, None
        pairs = zip(found, activations, strict=True)
        if all(o is not None and o.activation == a for o, a in pairs):
            weights = []
            for operands in found:
                weights += [operands.weight, operands.bias, operands.scale]
            weights.append(self.fc1.out_features)
            if any(o.weight.dim() == 2 for o in found):  # oneDNN's, with a rounded bias
                bias_keys = _bias_keys(layers)
        self._step_weights = (key, weights, bias_keys)
        return weights

    def clear_weight_caches(self) -> None:
        """Forget the one-call block step's operands (`forget_weight_caches`)."""
        self._step_weights = None
        self.weight_caches_cleared += 1

    def __getstate__(self) -> dict:
        # The kept operands follow the weights: copies and pickles ask the layers again.
        return {**super().__getstate__(), "_step_weights": None}

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_step_weights", None)  # blocks pickled before it was kept
        state.setdefault("weight_caches_cleared", 0)
        super().__setstate__(state)

    def _update_exact_sequences(
        self, state: dict[str, Tensor], qkv_rows: Tensor, selection: Selection
    ) -> tuple[Tensor, Tensor] | None:
        """The exact level's step over attention of each stream's whole sequence without a bias,
        in one call of the CPU kernel (`update_exact_sequences`): the attention output and the
        underflowed rows recomputed per stream; None where it does not apply."""
        if self.level != "exact" or self.partitioned or self.bias is not None:
            return None
        if self.attention_dtype is not None and all(
            exact_update_is_dense(count, selection.num_tokens) for count in selection.counts
        ):
            return None  # every row recomputed, in the attention dtype: `_recompute`
        sums = [state[name] for name in CACHES["exact"]]
        return update_exact_sequences(
            state["qkv"], qkv_rows, selection.flat, *sums, heads=self.heads
        )

    def _split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Views q, k, v (B, H, N, dh) of the qkv rows (B, N, 3 D)."""
        batch, num_tokens, _ = qkv.shape
        heads = qkv.view(batch, num_tokens, 3, self.heads, self.dim // self.heads)
        q, k, v = heads.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _grouped_heads(self, qkv: Tensor, layout: GroupLayout) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B * groups, H, L, dh) of the buffered qkv (B, N, 3 D): views under one
        group, else a copy.

        A window's padded slot has a zero input (as ViTDet pads after the first norm), so its
        q, k and v are the qkv projection's bias: the same on every step, never selected.
        """
        batch, _, channels = qkv.shape
        if layout.groups == 1:  # the slots are the tokens, in order
            return self._split_heads(qkv)
        grouped = qkv.new_zeros(batch, layout.groups * layout.length, channels)
        if self.qkv.bias is not None:
            grouped.copy_(self.qkv.bias.expand_as(grouped))
        grouped.index_copy_(1, layout.slot, qkv)
        return self._split_heads(grouped.view(batch * layout.groups, layout.length, channels))

    def _ungrouped(self, heads: Tensor, layout: GroupLayout, batch: int) -> Tensor:
        """Attention output per group (B * groups, H, L, dh) -> the tokens' rows (B, N, D)."""
        flat = heads.transpose(1, 2).reshape(batch, layout.groups * layout.length, self.dim)
        return flat if layout.groups == 1 else flat.index_select(1, layout.slot)

    def _bias(self, q: Tensor, layout: GroupLayout) -> Tensor | None:
        """The bias (G, H, L, L) of the groups whose queries are q (G, H, L, dh), if any."""
        return None if self.bias is None else self.bias(q, layout.sides).to(q.dtype)

    def _bias_for(self, q: Tensor, layout: GroupLayout) -> BiasFor | None:
        """The bias of some rows and columns of the groups whose queries are q, if any."""
        return None if self.bias is None else partial(self.bias.between, q, layout.sides)

    def _attend_every_row(
        self, qkv: Tensor, layout: GroupLayout, grid: tuple[int, int] | None, dtype: torch.dtype
    ) -> Tensor:
        """Attention output (B, N, D) in `dtype`, the step's, of every query over the buffered
        qkv (B, N, 3 D), within each attention group: the tokenwise level. With K/V pooling
        (global attention), the patches' keys and values are averaged over the grid's cells
        first."""
        if qkv.dtype == self.attention_dtype != dtype:  # already rounded (`_qkv_dtype`)
            low = self._grouped_heads(qkv, layout)
        else:
            low = None if self.kv_pool > 1 else self._low_precision_heads(qkv, layout)
        if low is not None:
            kernel = bfloat16_attention_kernel(*low)
            out = kernel(*low)[0] if kernel is not None else softmax_attention(*low)
            return self._ungrouped(out.to(dtype), layout, qkv.shape[0])
        q, k, v = self._grouped_heads(qkv, layout)
        if self.kv_pool > 1:
            k, v = pool_keys_values(k, v, grid, self.kv_pool)
        out = softmax_attention(q, k, v, self._bias(q, layout), self.attention_dtype)
        return self._ungrouped(out.to(dtype), layout, qkv.shape[0])

    def _qkv_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the qkv buffer for steps in `dtype`: the attention dtype where the
        tokenwise level attends in a lower precision without a bias or K/V pooling, since
        attention then reads the buffer only rounded to it (`_low_precision_heads`): the same
        values, rounded once as rows are written instead of at every step, in half the memory.
        Else `dtype`."""
        lower = self.attention_dtype is not None and self.attention_dtype != dtype
        if lower and self.level == "tokenwise" and self.bias is None and self.kv_pool == 1:
            return self.attention_dtype
        return dtype

    def _low_precision_heads(
        self, qkv: Tensor, layout: GroupLayout
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """q, k, v (B * groups, H, L, dh) in the attention dtype from the buffered qkv rounded
        to it at once, where the attention runs in a lower precision than the buffer and
        without a bias; else None. The values of q, k and v each rounded from their views, in
        one contiguous conversion instead of three strided ones."""
        dtype = self.attention_dtype
        if dtype is None or qkv.dtype == dtype or self.bias is not None:
            return None
        return self._grouped_heads(qkv.to(dtype), layout)

    def _plan(self, selection: Selection, fresh_streams: list[int], layout: GroupLayout):
        """Which groups of the batch this step recomputes and which it updates, and how.

        A group is recomputed over every row when its stream is fresh or every token is
        selected, and at the exact level also when a fifth or more of its positions changed
        (then a recompute takes less time); at the full level a group with a third or more
        changed is updated with every row's log-sum-exp recomputed. Groups without a change are
        left alone.
        """
        batch, groups, length = selection.batch_size, layout.groups, layout.length
        total = batch * groups
        device = selection.flat.device
        if selection.everything or len(fresh_streams) == batch:
            counts = torch.full((total,), length, device=device)
            return _Plan(counts, [_Update(None, None)])
        if not self.partitioned and not fresh_streams and len(set(selection.counts)) == 1:
            return self._plan_equal_counts(selection)
        flat = selection.flat
        slots = (flat // selection.num_tokens) * (groups * length)
        slots += layout.slot[flat % selection.num_tokens]
        changed = torch.zeros(total * length, dtype=torch.bool, device=device)
        changed[slots] = True
        changed = changed.view(total, length)
        counts = changed.sum(dim=1)
        fresh = torch.zeros(total, dtype=torch.bool, device=device)
        for stream in fresh_streams:
            fresh[stream * groups : (stream + 1) * groups] = True
        if self.level == "full":
            # A window's padded slot never changes, so no gate selects it; but its attention
            # column moves with the row's normalisation, and the full level updates only the
            # columns it is given: the groups it updates update their padded slots too.
            changed |= layout.padded.repeat(batch, 1) & (counts > 0).unsqueeze(1)
            counts = changed.sum(dim=1)
        large = self._recompute_pays(counts, length) & ~fresh
        updated = (counts > 0) & ~fresh
        recomputed, every_row = fresh, None
        if self.level == "exact":
            recomputed, updated = fresh | large, updated & ~large
        elif self.level == "full":
            every_row, updated = large, updated & ~large
        updates = []
        for groups_mask, kind in ((recomputed, None), (updated, False), (every_row, True)):
            if groups_mask is None or not bool(groups_mask.any()):
                continue
            chosen = None if bool(groups_mask.all()) else groups_mask.nonzero().squeeze(1)
            changes = None
            if kind is not None:
                changes = Changes.from_mask(changed if chosen is None else changed[chosen])
            updates.append(_Update(chosen, changes, every_row=bool(kind)))
        return _Plan(counts, updates)

    def _plan_equal_counts(self, selection: Selection) -> _Plan:
        """`_plan` for attention over the whole sequence (one group per stream, its positions
        the tokens) when every stream selected the same number of tokens (a top-k policy) and
        none is fresh: one update of every group, its changes read straight from the
        selection, no mask."""
        batch, count = selection.batch_size, selection.counts[0]
        device = selection.flat.device
        counts = torch.full((batch,), count, device=device)
        if count == 0:
            return _Plan(counts, [])
        large = self._recompute_pays(count, selection.num_tokens)
        if self.level == "exact" and large:
            return _Plan(counts, [_Update(None, None)])
        per_stream = selection.per_stream
        index = per_stream[0].unsqueeze(0) if batch == 1 else torch.stack(per_stream)
        valid = torch.ones(index.shape, dtype=torch.bool, device=device)
        changes = Changes(index, valid)
        return _Plan(counts, [_Update(None, changes, every_row=self.level == "full" and large)])

    def _recompute_pays(self, counts: int | Tensor, length: int) -> bool | Tensor:
        """Whether `counts` changed positions of a group are enough for the exact level to
        recompute every row, and for the full level every row's log-sum-exp."""
        if self.level == "exact":
            return exact_update_is_dense(counts, length)
        return full_update_is_dense(counts, length)

    def _keys_values_before(
        self, qkv: Tensor, layout: GroupLayout, plan: _Plan
    ) -> list[tuple[Tensor, Tensor] | None]:
        """Per update of the plan, the keys and values (G, H, m, dh) at its changed positions,
        read before the step overwrites them (None for a recompute)."""
        _, k, v = self._grouped_heads(qkv, layout)
        old = []
        for update in plan.updates:
            if update.changes is None:
                old.append(None)
                continue
            index = update.changes.index
            old.append(tuple(at_positions(_of_groups(x, update.groups), index) for x in (k, v)))
        return old

    def _attend_cached(self, state, layout, plan, old_keys_values) -> tuple[Tensor, Tensor]:
        """Attention output (B, N, D) from this level's caches, each update of the plan run on
        its groups with one call per operation; and the underflowed rows that the full and
        exact levels recomputed beyond the selection, per group (B * groups,)."""
        batch = state["qkv"].shape[0]
        q, k, v = self._grouped_heads(state["qkv"], layout)
        names = CACHES[self.level]
        lost = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        low = None  # q, k, v in the attention dtype, for the exact level's recomputes
        recomputed_output = None  # their output, where one recompute covers every group
        for update, old in zip(plan.updates, old_keys_values, strict=True):
            heads = [_of_groups(x, update.groups) for x in (q, k, v)]
            caches = [_of_groups(state[name], update.groups) for name in names]
            if update.changes is None and self.level == "exact":
                low = low or self._low_precision_heads(state["qkv"], layout)
            if update.changes is None and low is not None:
                output = recompute_exact_groups(
                    *caches, *(_of_groups(x, update.groups) for x in low)
                )
                recomputed_output = output if update.groups is None else None
            elif update.changes is None:
                self._recompute(caches, heads, self._bias(heads[0], layout))
            else:
                bias_for = self._bias_for(heads[0], layout)
                if self.level == "qk":
                    update_query_key_groups(*caches, *heads[:2], update.changes, bias_for)
                elif self.level == "exact":
                    counts = update_exact_groups(*caches, *heads, *old, update.changes, bias_for)
                else:
                    counts = update_full_groups(
                        *caches, *heads, *old, update.changes, bias_for, update.every_row
                    )
                if self.level != "qk":
                    lost.index_add_(0, _all_if_none(update.groups, lost), counts)
            if update.groups is not None:  # the caches were copies of those groups
                for name, cache in zip(names, caches, strict=True):
                    state[name].index_copy_(0, update.groups, cache)
        if self.level == "exact" and recomputed_output is not None and plan.recomputes_everything:
            # The numerator itself, converted as it is laid out by PyTorch's fused attention
            # (the heads side by side): the tokens' rows are then a view, not a transposing copy.
            out = recomputed_output.to(q.dtype)
        elif self.level == "exact":
            out = state["attention_numerator"]
            if not plan.recomputes_everything:  # else every denominator is 1
                out = out / state["attention_denominator"].unsqueeze(-1)
        elif self.level == "qk":
            out = torch.matmul(state["query_key_product"].softmax(dim=-1, dtype=v.dtype), v)
        else:
            out = state["attention_value_product"]
        return self._ungrouped(out, layout, batch), lost

    def _recompute(self, caches: list[Tensor], heads: list[Tensor], bias: Tensor | None) -> None:
        """Rebuild this level's caches of some groups from their q, k, v (G, H, L, dh)."""
        if self.level == "exact":
            recompute_exact_groups(*caches, *heads, bias, self.attention_dtype)
        elif self.level == "qk":
            caches[0].copy_(query_key_product(*heads[:2], bias).to(caches[0].dtype))
        else:
            recompute_full_attention(*caches, *heads, bias)

    def _attention_costs(
        self, layout: GroupLayout, plan: _Plan, lost: Tensor
    ) -> list[tuple[int, int]]:
        """Per stream, the (multiply-accumulates, adds) of its attention groups this step."""
        groups, length = layout.groups, layout.length
        sides = None if self.bias is None else layout.sides
        recomputing = torch.zeros(plan.counts.numel(), dtype=torch.bool)
        for update in plan.updates:
            if update.changes is None:
                recomputing[_all_if_none(update.groups, recomputing).cpu()] = True
        counts, lost, recomputing = plan.counts.tolist(), lost.tolist(), recomputing.tolist()
        costs = []
        for stream in range(len(counts) // groups):
            macs, adds = 0, 0
            span = range(stream * groups, (stream + 1) * groups)
            if all(recomputing[group] for group in span):
                macs, adds = dense_attention_cost(length, self.dim, self.heads, sides)
                costs.append((groups * macs, groups * adds))
                continue
            for group in span:
                cost = self._update_cost(counts[group], lost[group], length, sides)
                macs, adds = macs + cost[0], adds + cost[1]
            if self.level == "qk":  # every group's softmax of its cached logits, times V
                macs += groups * length * length * self.dim
            costs.append((macs, adds))
        return costs

    def _update_cost(self, count, lost, length, sides) -> tuple[int, int]:
        """(Multiply-accumulates, adds) of one group's update for `count` changed positions."""
        if self.level == "qk":
            return query_key_update_cost(length, count, self.dim, self.heads, sides)
        if self.level == "exact":
            return exact_update_cost(length, count, lost, self.dim, self.heads, sides)
        return full_update_cost(length, count, lost, self.dim, self.heads, sides)


# The caches of each level, in the order its update functions take them.
CACHES = {
    "qk": ("query_key_product",),
    "full": (
        "attention_value_product",
        "attention_reference",
        "attention_denominator",
        "attention_shift",
    ),
    "exact": ("attention_numerator", "attention_denominator", "attention_shift"),
}


# The gates of a block, in step order.
GATES = ("qkv", "proj", "mlp")

# The token state a block step in one call (`kernels.block_step`) updates, in its arguments'
# order (the exact level's running sums follow).
STEP_STATE = ("qkv_reference", "qkv", "proj_reference", "proj", "mlp_reference", "mlp")


@dataclass(frozen=True)
class OneCallOperands:
    """A block's operands of a step in one call (`kernels.block_step`, `kernels.blocks_step`):
    its 28 tensors in the kernels' order (`STEP_STATE`, the exact level's sums or three None, the
    gates' scales, each LayerNorm's weight and bias, per linear layer its panels, bias and panel
    scale), its LayerNorms' eps, and its integers: fc1's width, the tokens per stream, the heads,
    `dense_from`, 1 where attention runs in bfloat16."""

    tensors: list[Tensor | None]
    eps: tuple[float, float]
    integers: tuple[int, int, int, int, int]


def steps_in_one_call(
    blocks: Sequence[nn.Module],
    state: StreamState,
    policy: Policy,
    x: Tensor,
    escalation: Escalation | None,
    trace: StepTrace | None,
    taps: Collection[int],
) -> tuple[Tensor, list[Tensor]] | None:
    """Consecutive blocks' steps without a fresh stream in one call of the CPU kernel
    (`kernels.blocks_step`), where every block would run its step in one call
    (`EventfulBlock.one_call_operands`): the same kernels in the same order, bit for bit,
    without the Python between blocks, which took some 60 us a block at ViT-S's size, its
    objects evicted from the caches by the block before. Returns the last block's output and
    the outputs of the blocks (numbered from 1) in `taps`, in order; None where it does not
    apply."""
    kernel = kernels.blocks_step()
    if kernel is None or not (FUSED_BLOCK_STEPS and BLOCKS_IN_ONE_CALL and LEAN_STEPS):
        return None
    if escalation is not None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if any(type(block) is not EventfulBlock or _runs_forward_hooks(block) for block in blocks):
        return None
    operands = _blocks_operands(blocks, state, policy, x)
    if operands is None:
        return None
    tensors, eps, integers = operands
    stages = [stage for stage in range(1, len(blocks) + 1) if stage in taps]
    measure = trace is not None
    out, tapped, traced = kernel(x, tensors, eps, integers, stages, UNDERFLOW, measure)
    if measure:
        per_block = len(traced) // len(blocks)
        for first in range(0, len(traced), per_block):
            lost, *gates = traced[first : first + per_block]
            trace.record_block(_fused_gate_steps(gates, x.shape[1]), lost.tolist())
    return out, list(tapped)


def _blocks_operands(
    blocks: Sequence[EventfulBlock], state: StreamState, policy: Policy, x: Tensor
) -> tuple[list, list, list] | None:
    """The operands of `kernels.blocks_step` for this step, or None where a block would not run
    its step in one call. Kept on the stream's state (`KeptOperands`) while they hold: asking
    every block again took some 0.4 ms a step at ViT-S's size, about 2% of a still camera's."""
    policies = [policy.for_block(block_state, []) for block_state in state.blocks]
    num_tokens = x.shape[1]
    key = (
        tuple(x.shape),
        x.dtype,
        x.device,
        x.is_contiguous(),
        current_compute_dtype(),
        tuple((p.norm, p.largest_count(num_tokens)) for p in policies),
    )
    kept = state.kept_operands
    if isinstance(kept, KeptOperands) and kept.hold(key, blocks, state.blocks):
        return kept.tensors, kept.eps, kept.integers
    state.kept_operands = None
    tensors, eps, integers = [], [], []
    for block, block_state, block_policy in zip(blocks, state.blocks, policies, strict=True):
        operands = block.one_call_operands(x, block_state, block_policy, None)
        if operands is None:
            return None
        tensors += operands.tensors
        eps += operands.eps
        integers += operands.integers
    state.kept_operands = KeptOperands(key, blocks, state.blocks, tensors, eps, integers)
    return tensors, eps, integers


class KeptOperands:
    """A stream's operands of its last step of the blocks in one call (`_blocks_operands`), and
    what tells whether they still hold: the step's key (x's shape, dtype, device and layout, the
    compute dtype, each block's policy norm and count); the blocks themselves, each block's
    submodules, parameters and buffers (`ModuleWatch`), its norms' eps and how often its weight
    caches were cleared (`forget_weight_caches`); and the stream's cached tensors, each the same
    object. What else the operands depend on (a block's level, heads, precision) is fixed at
    conversion."""

    def __init__(
        self,
        key: tuple,
        blocks: Sequence[EventfulBlock],
        states: Sequence[dict[str, Tensor]],
        tensors: list,
        eps: list,
        integers: list,
    ) -> None:
        self.key = key
        self.blocks = list(blocks)
        self.watches = [ModuleWatch(block) for block in blocks]
        self.norms = [(norm, norm.eps) for block in blocks for norm in (block.norm1, block.norm2)]
        self.cleared = [block.weight_caches_cleared for block in blocks]
        self.states = [list(block_state.values()) for block_state in states]
        self.tensors, self.eps, self.integers = tensors, eps, integers

    def hold(
        self, key: tuple, blocks: Sequence[EventfulBlock], states: Sequence[dict[str, Tensor]]
    ) -> bool:
        """Whether these operands are those `_blocks_operands` would make now."""
        if key != self.key or len(blocks) != len(self.blocks) or len(states) != len(self.states):
            return False
        for block, kept, cleared in zip(blocks, self.blocks, self.cleared, strict=True):
            if block is not kept or block.weight_caches_cleared != cleared:
                return False
        if not all(norm.eps == eps for norm, eps in self.norms):
            return False
        for block_state, kept in zip(states, self.states, strict=True):
            if len(block_state) != len(kept):
                return False
            if not all(t is k for t, k in zip(block_state.values(), kept, strict=True)):
                return False
        return all(watch.unchanged() for watch in self.watches)


def _runs_forward_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run forward hooks, its own or global ones."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    )


def _bias_keys(layers: tuple[PackedLinear, ...]) -> tuple:
    """What tells whether the layers' biases still hold the values a copy was made from."""
    return tuple(None if layer.bias is None else tensor_key(layer.bias) for layer in layers)


def _fused_gate_steps(gates: list[Tensor | None], num_tokens: int) -> dict[str, GateStep]:
    """The gate steps of a block step in one call, for its trace: per gate (`GATES`) its token
    indices (B, count), rows and unprocessed share."""
    return {
        name: GateStep(Selection.from_indices(index, num_tokens), rows, share)
        for name, (index, rows, share) in zip(
            GATES, (gates[0:3], gates[3:6], gates[6:9]), strict=True
        )
    }


@dataclass(frozen=True)
class _LeanStep:
    """A block's lean step: the tokens per stream, and each LayerNorm's weight, bias and eps."""

    count: int
    norm1: tuple[Tensor | None, Tensor | None, float]
    norm2: tuple[Tensor | None, Tensor | None, float]


@dataclass(frozen=True)
class _Update:
    """One batched call of a plan: its groups (indices into the batch's groups; None: all),
    their changed positions (None: recompute every row), and for the full level whether every
    row's log-sum-exp is recomputed."""

    groups: Tensor | None
    changes: Changes | None
    every_row: bool = False


@dataclass(frozen=True)
class _Plan:
    """A step's attention plan: each group's count of changed positions (B * groups,), and
    the updates that cover every group with a change."""

    counts: Tensor
    updates: list[_Update]

    @property
    def recomputes_everything(self) -> bool:
        return len(self.updates) == 1 and self.updates[0] == _Update(None, None)


def _of_groups(x: Tensor, groups: Tensor | None) -> Tensor:
    """x (B * groups, ...) itself, or a copy of the groups `groups`."""
    return x if groups is None else x.index_select(0, groups)


def _all_if_none(groups: Tensor | None, like: Tensor) -> Tensor:
    return torch.arange(like.shape[0], device=like.device) if groups is None else groups
