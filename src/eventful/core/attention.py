"""Incremental attention products for one stream, over buffered q, k, v of shape (H, N, dh).

The query scale is folded into the q projection, so logits are plain q . k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from eventful.core.gates import delta_gate


def update_query_key_product(logits: Tensor, q: Tensor, k: Tensor, index: Tensor) -> None:
    """Cached query-key product (H, N, N): new queries rewrite rows, new keys rewrite columns.

    q, k: (H, N, dh), already holding the new rows at `index` (s,). Afterwards logits == q k^T.
    Cost: 2 s N dh per head instead of N^2 dh.
    """
    rows = torch.matmul(q.index_select(1, index), k.transpose(1, 2))
    logits.index_copy_(1, index, rows)
    columns = torch.matmul(q, k.index_select(1, index).transpose(1, 2))
    logits.index_copy_(2, index, columns)


def update_attention_value_product(
    product: Tensor,
    attention: Tensor,
    attention_reference: Tensor,
    new_values: Tensor,
    old_values: Tensor,
    index: Tensor,
) -> None:
    """Cached attention-value product (H, N, dh), updated by the deltas of the tokens `index`.

    With dA the change of the attention columns at `index` since their reference (a delta
    gate) and dV = new_values - old_values (H, s, dh):  product += A[:, S] dV + dA V_old.
    Columns outside `index` keep their stale share of the product: the paper's approximation.
    """
    new_columns = attention.index_select(2, index)
    attention_delta = delta_gate(new_columns, attention_reference, index, dim=2)
    product.baddbmm_(new_columns, new_values - old_values)
    product.baddbmm_(attention_delta, old_values)


def recompute_attention_rows(
    numerator: Tensor,
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: Tensor,
) -> None:
    """Unnormalised attention of the queries `rows` over all keys, written into the running sums.

    numerator (H, N, dh) holds U_i = sum_j exp(l_ij - m_i) v_j, denominator (H, N) Z_i and shift
    (H, N) m_i, with logits l_ij = q_i . k_j; the attention output of row i is U_i / Z_i.
    """
    logits = torch.matmul(q.index_select(1, rows), k.transpose(1, 2))
    row_shift = logits.amax(dim=-1)
    weights = torch.exp(logits - row_shift.unsqueeze(-1))
    numerator.index_copy_(1, rows, torch.matmul(weights, v))
    denominator.index_copy_(1, rows, weights.sum(dim=-1))
    shift.index_copy_(1, rows, row_shift)


def update_exact_attention(
    numerator: Tensor,
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    old_keys: Tensor,
    old_values: Tensor,
    index: Tensor,
) -> int:
    """Exact incremental attention (DESIGN.md, "Beyond the paper"): no N x N cache or softmax.

    The tokens `index` (s,) changed: `old_keys`, `old_values` (H, s, dh) are their keys and
    values before the change, q, k, v (H, N, dh) hold the new ones. Every row swaps the old
    contribution of those keys for the new one, after raising its shift to the largest new
    logit (so no exponent overflows); the changed queries' rows are recomputed over all keys;
    rows whose denominator has underflowed are recomputed too (finding them reads one count
    back from the device). Cost: 6 s N dh per head. Returns how many underflowed rows were
    recomputed.
    """
    if index.numel() == 0:
        return 0
    count = index.shape[0]
    # Old and new keys side by side: one matmul for all logits, one for all value updates.
    keys = torch.cat([k.index_select(1, index), old_keys], dim=1)
    values = torch.cat([v.index_select(1, index), -old_values], dim=1)
    logits = torch.matmul(q, keys.transpose(1, 2))
    raised = torch.maximum(shift, logits[..., :count].amax(dim=-1))
    rescale = torch.exp(shift - raised)
    numerator.mul_(rescale.unsqueeze(-1))
    denominator.mul_(rescale)
    shift.copy_(raised)
    weights = torch.exp(logits - raised.unsqueeze(-1))
    numerator.baddbmm_(weights, values)
    denominator.add_(weights[..., :count].sum(dim=-1)).sub_(weights[..., count:].sum(dim=-1))
    recompute_attention_rows(numerator, denominator, shift, q, k, v, index)
    underflowed = (denominator < UNDERFLOW).any(dim=0).nonzero().squeeze(1)
    if underflowed.numel() > 0:
        recompute_attention_rows(numerator, denominator, shift, q, k, v, underflowed)
    return underflowed.numel()


# A denominator this small means the row's shift has gone stale far above its logits (its
# largest key changed and dropped): its sums have lost their precision, so recompute the row.
UNDERFLOW = 1e-20
