"""Token gate and token buffer, as functions over explicit state tensors.

A gate's *reference* holds, for every token, the value it had when it was last selected.
Unselected tokens keep their old reference, so their error keeps accumulating until a policy
picks them: nothing drifts without bound under a threshold.

With `previous_frame` (the STGT gate, a baseline) the error is instead each token's change
since the previous step, selected or not: every reference takes the current value after the
selection. A token that changes a little at every step is then never selected, however far it
has drifted from what was last processed.

A gate also measures what it leaves undone: its *unprocessed share*, per stream, is the sum of
the L2 norms of the unselected tokens' changes since they were last processed, over N times the
gate's *scale* (the mean L2 norm of the gate's input tokens at the stream's last dense step).
It is a share of the gate input's size, comparable between gates and models: 0 when every token
is selected, about 1 when every token changed by as much as a typical token's whole size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eventful.core import kernels
from eventful.core.escalation import Escalation
from eventful.core.policies import Policy
from eventful.core.selection import Selection


@dataclass(frozen=True)
class GateStep:
    """What one gate did in one step.

    selection: the tokens selected; rows: their rows (M, D) of the gate input (through the
    gate's `norm`, where it has one); unprocessed:
    per stream (B,), the unprocessed share after the selection (None unless measured);
    escalated: per stream, the tokens escalation added beyond the policy's (None if none).
    """

    selection: Selection
    rows: Tensor
    unprocessed: Tensor | None = None
    escalated: list[int] | None = None


def token_gate(
    current: Tensor,
    reference: Tensor,
    scale: Tensor,
    policy: Policy,
    fresh_streams: list[int],
    escalation: Escalation | None = None,
    measure: bool = False,
    previous_frame: bool = False,
    norm: nn.Module | None = None,
) -> GateStep:
    """Select the tokens of `current` that changed most since their reference.

    current, reference: (B, N, D); scale: (B,), the gate's scale, which fresh streams renew.
    Sets `reference` to `current` at the selected tokens. Streams listed in `fresh_streams`
    have no valid reference and select every token. `escalation` adds tokens beyond the
    policy's while a stream's unprocessed share exceeds its bound; `measure` reports the share.
    `previous_frame`: measure change since the previous step (STGT) instead of since each
    token's reference. `norm`: a module the selected rows go through (a block's norm before the
    layer the gate feeds), in the same pass as their gathering where it is a `nn.LayerNorm`.
    """
    batch, num_tokens, dim = current.shape
    if len(fresh_streams) == batch:  # every stream: no gather
        scale.copy_(torch.linalg.vector_norm(current, dim=-1).mean(1))
    elif fresh_streams:
        norms = torch.linalg.vector_norm(current[fresh_streams], dim=-1).mean(1)
        scale[fresh_streams] = norms.to(scale.dtype)
    every_token = policy.tokens_per_stream(num_tokens) == num_tokens
    if len(fresh_streams) == batch or every_token:
        # Every token of every stream, whatever the change: no error to compute, nothing left
        # unprocessed, nothing for escalation to add.
        reference.copy_(current)
        selection = Selection.all_tokens(batch, num_tokens, current.device)
        unprocessed = current.new_zeros(batch) if measure else None
        rows = current.reshape(-1, dim)
        return GateStep(selection, rows if norm is None else norm(rows), unprocessed)
    error_norms = error_norms_of(current, reference, policy.norm)
    if policy.needs_gate_size:
        selection = policy.select_within_size(error_norms, gate_size(scale, num_tokens))
    else:
        selection = policy.select(error_norms)
    selection = selection.with_all_tokens_for(fresh_streams)
    unprocessed = escalated = None
    if escalation is not None or measure:
        l2_norms = error_norms if policy.norm == 2 else error_norms_of(current, reference, 2)
        if escalation is not None:
            size = gate_size(scale, num_tokens)
            selection, escalated = escalation.extend(selection, l2_norms, size)
        if measure:
            unprocessed = unprocessed_share(l2_norms, selection, scale)
    if previous_frame:
        rows = gather_rows(current, selection)
        reference.copy_(current)
        rows = rows if norm is None else norm(rows)
    else:
        rows = commit_rows(current, reference, selection, norm)
    return GateStep(selection, rows, unprocessed, escalated)


def lean_gate(
    current: Tensor,
    reference: Tensor,
    scale: Tensor,
    count: int,
    norm: tuple[Tensor | None, Tensor | None, float] | None = None,
    measure: bool = False,
) -> GateStep:
    """`token_gate` where a policy takes each stream's `count` < N tokens of largest L2 error
    (`Policy.largest_count`), no stream is fresh, nothing escalates, and the CPU kernels take
    the tensors (`lean_gates_apply`): the same step, bit for bit, without `token_gate`'s checks
    and branches. `norm`: the weight, bias and eps of the LayerNorm the rows go through
    (`fused_layer_norm`), or None."""
    num_tokens = current.shape[1]
    error_norms = kernels.gate_error_norms()(current, reference)
    index = error_norms.topk(count, dim=1, sorted=False).indices
    selection = Selection.from_indices(index, num_tokens)
    commit = kernels.commit_rows()
    if norm is None:
        rows = commit(current, reference, selection.flat)
    else:
        rows = commit(current, reference, selection.flat, *norm)
    unprocessed = unprocessed_share(error_norms, selection, scale) if measure else None
    return GateStep(selection, rows, unprocessed)


def lean_gates_apply(*tensors: Tensor) -> bool:
    """Whether `lean_gate` and `kernels.add_rows` take these tensors as the general gates
    would: float32 CPU tensors outside autograd, contiguous, with the kernels built."""
    return (
        kernels.gate_error_norms() is not None
        and kernels.can_take(*tensors)
        and all(t.is_contiguous() for t in tensors)
    )


def unprocessed_share(l2_norms: Tensor, selection: Selection, scale: Tensor) -> Tensor:
    """Per stream (B,), the L2 error norms (B, N) of the tokens `selection` left out, over the
    gate's size (`gate_size`). One kernel call for float32 CPU tensors outside autograd
    (`kernels.unprocessed_share`), which sums in token order."""
    if kernels.can_take(l2_norms, scale) and l2_norms.is_contiguous():
        kernel = kernels.unprocessed_share()
        if kernel is not None:
            return kernel(l2_norms, selection.flat, scale)
    # The selected tokens' norms zeroed by their flat indices: no mask.
    left = l2_norms.reshape(-1).index_fill(0, selection.flat, 0).view_as(l2_norms)
    return left.sum(1) / gate_size(scale, l2_norms.shape[1])


def gate_size(scale: Tensor, num_tokens: int) -> Tensor:
    """Per stream (B,), the unit of a gate's unprocessed share: N times its scale."""
    return scale.clamp_min(torch.finfo(scale.dtype).tiny) * num_tokens


def error_norms_of(current: Tensor, reference: Tensor, norm: float) -> Tensor:
    """Per token (B, N), the `norm` of current - reference (B, N, D). The L2 norm of float32
    CPU tensors outside autograd takes one pass, with no temporary (`kernels.gate_error_norms`)."""
    if norm == 2 and _one_pass_applies(current, reference):
        kernel = kernels.gate_error_norms()
        if kernel is not None:
            return kernel(current, reference)
    return torch.linalg.vector_norm(current - reference, ord=norm, dim=-1)


def _one_pass_applies(current: Tensor, reference: Tensor) -> bool:
    return (
        kernels.can_take(current, reference)
        and current.is_contiguous()
        and reference.is_contiguous()
        and current.shape == reference.shape
    )


def gather_rows(tokens: Tensor, selection: Selection) -> Tensor:
    """Selected rows (M, D) of tokens (B, N, D)."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    return flat if selection.everything else flat.index_select(0, selection.flat)


def write_rows(buffer: Tensor, selection: Selection, rows: Tensor) -> None:
    """Token buffer update: put rows (M, D) at the selected tokens of buffer (B, N, D), rounded
    to the buffer's dtype."""
    if selection.everything:
        buffer.copy_(rows.view_as(buffer))
    else:
        buffer.view(-1, buffer.shape[-1]).index_copy_(0, selection.flat, rows.to(buffer.dtype))


def commit_rows(
    current: Tensor, reference: Tensor, selection: Selection, norm: nn.Module | None = None
) -> Tensor:
    """The selected rows (M, D) of current (B, N, D), which the reference (B, N, D) takes, and
    then through `norm` if given. One pass for float32 CPU tensors outside autograd
    (`kernels.commit_rows`), the norm in it where it is a `nn.LayerNorm` over the features."""
    if not selection.everything and _one_pass_applies(current, reference):
        kernel = kernels.commit_rows()
        if kernel is not None:
            fused = fused_layer_norm(norm, current)
            if fused is not None:
                return kernel(current, reference, selection.flat, *fused)
            rows = kernel(current, reference, selection.flat)
            return rows if norm is None else norm(rows)
    rows = gather_rows(current, selection)
    write_rows(reference, selection, rows)
    return rows if norm is None else norm(rows)


def fused_layer_norm(
    norm: nn.Module | None, current: Tensor
) -> tuple[Tensor | None, Tensor | None, float] | None:
    """The weight, bias and eps of `norm` for `kernels.commit_rows`: a `nn.LayerNorm` over the
    features of current, with float32 parameters or none, outside autograd; else None."""
    if type(norm) is not nn.LayerNorm or norm.normalized_shape != (current.shape[-1],):
        return None
    if not norm.eps > 0:  # the kernel reads eps 0 as no normalisation
        return None
    weight, bias = norm.weight, norm.bias
    parameters = [t for t in (weight, bias) if t is not None]
    if not kernels.can_take(*parameters) or not all(t.is_contiguous() for t in parameters):
        return None
    return weight, bias, float(norm.eps)


def add_rows(x: Tensor, buffer: Tensor, selection: Selection, rows: Tensor) -> Tensor:
    """Token buffer update and residual: buffer (B, N, D) takes rows (M, D) at the selected
    tokens, and x + buffer is returned. One pass for float32 CPU tensors outside autograd
    (`kernels.add_rows`)."""
    if (
        not selection.everything
        and _one_pass_applies(x, buffer)
        and kernels.can_take(rows)
        and rows.is_contiguous()
    ):
        kernel = kernels.add_rows()
        if kernel is not None:
            return kernel(x, buffer, selection.flat, rows)
    write_rows(buffer, selection, rows)
    return x + buffer


def unprocessed_change(current: Tensor, reference: Tensor) -> Tensor:
    """Per stream (B,), the change a gate has not passed on: summed L2 norms of current - reference.

    Call it after the gate ran on current, reference (B, N, D): selected tokens then equal their
    reference, so only unselected tokens count, each with its change since it was last processed.
    """
    return torch.linalg.vector_norm(current - reference, dim=-1).sum(1)
