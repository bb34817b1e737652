"""Token gate, delta gate and token buffer, as functions over explicit state tensors.

A gate's *reference* holds, for every token, the value it had when it was last selected.
Unselected tokens keep their old reference, so their error keeps accumulating until a policy
picks them: nothing drifts without bound under a threshold.
"""

from __future__ import annotations

import torch
from torch import Tensor

from eventful.core.policies import Policy
from eventful.core.selection import Selection


def token_gate(
    current: Tensor, reference: Tensor, policy: Policy, fresh_streams: list[int]
) -> tuple[Selection, Tensor]:
    """Select the tokens of `current` that changed most since their reference.

    current, reference: (B, N, D). Returns the selection and the selected rows (M, D) of
    `current`, and sets `reference` to `current` at the selected tokens. Streams listed in
    `fresh_streams` have no valid reference and select every token.
    """
    batch, num_tokens, dim = current.shape
    if len(fresh_streams) == batch:
        reference.copy_(current)
        return Selection.all_tokens(batch, num_tokens, current.device), current.reshape(-1, dim)
    error_norms = torch.linalg.vector_norm(current - reference, ord=policy.norm, dim=-1)
    selection = policy.select(error_norms).with_all_tokens_for(fresh_streams)
    rows = gather_rows(current, selection)
    write_rows(reference, selection, rows)
    return selection, rows


def delta_gate(new_rows: Tensor, reference: Tensor, index: Tensor, dim: int) -> Tensor:
    """Change of the selected slices since their reference; the reference takes the new values.

    `new_rows` are the slices of the current value at `index` along `dim` of `reference`.
    """
    delta = new_rows - reference.index_select(dim, index)
    reference.index_copy_(dim, index, new_rows.to(reference.dtype))
    return delta


def gather_rows(tokens: Tensor, selection: Selection) -> Tensor:
    """Selected rows (M, D) of tokens (B, N, D)."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    return flat if selection.everything else flat.index_select(0, selection.flat)


def write_rows(buffer: Tensor, selection: Selection, rows: Tensor) -> None:
    """Token buffer update: put rows (M, D) at the selected tokens of buffer (B, N, D)."""
    if selection.everything:
        buffer.copy_(rows.view_as(buffer))
    else:
        buffer.view(-1, buffer.shape[-1]).index_copy_(0, selection.flat, rows)


def unprocessed_change(current: Tensor, reference: Tensor) -> Tensor:
    """Per stream (B,), the change a gate has not passed on: summed L2 norms of current - reference.

    Call it after the gate ran on current, reference (B, N, D): selected tokens then equal their
    reference, so only unselected tokens count, each with its change since it was last processed.
    """
    return torch.linalg.vector_norm(current - reference, dim=-1).sum(1)
