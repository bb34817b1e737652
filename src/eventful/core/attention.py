"""Incremental attention products for one stream, over buffered q, k, v of shape (H, N, dh).

The query scale is folded into the q projection, so logits are plain q . k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from eventful.core.gates import delta_gate

# An attention bias for one group of tokens: bias_for(rows, columns) gives the logits' additive
# term (H, r, c) for the query rows and key columns given as index tensors (None: all of them).
BiasFor = Callable[[Tensor | None, Tensor | None], Tensor]


def update_query_key_product(
    logits: Tensor, q: Tensor, k: Tensor, index: Tensor, bias_for: BiasFor | None = None
) -> None:
    """Cached query-key product (H, N, N): new queries rewrite rows, new keys rewrite columns.

    q, k: (H, N, dh), already holding the new rows at `index` (s,). Afterwards logits == q k^T
    (plus the bias, if any, for exactly the rows and columns rewritten).
    Cost: 2 s N dh per head instead of N^2 dh.
    """
    rows = torch.matmul(q.index_select(1, index), k.transpose(1, 2))
    if bias_for is not None:
        rows = rows + bias_for(index, None)
    logits.index_copy_(1, index, rows.to(logits.dtype))
    columns = torch.matmul(q, k.index_select(1, index).transpose(1, 2))
    if bias_for is not None:
        columns = columns + bias_for(None, index)
    logits.index_copy_(2, index, columns.to(logits.dtype))


def query_key_product(q: Tensor, k: Tensor, bias: Tensor | None = None) -> Tensor:
    """All logits (..., H, N, N): q k^T, plus the bias if any."""
    logits = torch.matmul(q, k.transpose(-1, -2))
    return logits if bias is None else logits + bias


def update_attention_value_product(
    product: Tensor,
    new_columns_by_key: Tensor,
    reference_by_key: Tensor,
    new_values: Tensor,
    old_values: Tensor,
    index: Tensor,
) -> None:
    """Cached attention-value product (H, N, dh), updated by the deltas of the tokens `index`.

    new_columns_by_key (H, s, N): the current attention columns A[:, S] of the changed keys,
    key-major. With dA their change since their reference (a delta gate) and
    dV = new_values - old_values (H, s, dh):  product += A[:, S] dV + dA V_old. Columns outside
    `index` keep their stale share of the product: the paper's approximation. The reference is
    stored key-major, (H, N keys, N queries), so that the columns a step reads and writes are
    contiguous rows.
    """
    attention_delta = delta_gate(new_columns_by_key, reference_by_key, index, dim=1)
    product.baddbmm_(new_columns_by_key.transpose(1, 2), new_values - old_values)
    product.baddbmm_(attention_delta.transpose(1, 2), old_values)


def recompute_full_attention(
    product: Tensor,
    reference_by_key: Tensor,
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
) -> None:
    """Dense step of the full level: product = A V, reference = A^T, row sums at A's log-sum-exp.

    The only place the full level forms an N x N softmax: a fresh stream's first step. Works on
    (H, N, dh) or on a batch of groups (G, H, N, dh); `bias` is added to the logits.
    """
    logits = query_key_product(q, k, bias)
    logsumexp = torch.logsumexp(logits, dim=-1)
    attention = torch.exp(logits.sub_(logsumexp.unsqueeze(-1)))
    reference_by_key.copy_(attention.transpose(-1, -2))
    torch.matmul(attention, v, out=product)
    shift.copy_(logsumexp)
    denominator.fill_(1.0)


def update_full_attention(
    product: Tensor,
    reference_by_key: Tensor,
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    old_keys: Tensor,
    old_values: Tensor,
    index: Tensor,
    bias_for: BiasFor | None = None,
) -> int:
    """The paper's full-level update, with no N x N softmax and no cached query-key product.

    The attention columns A[:, S] of the changed keys `index` (s,) are all the update of the
    attention-value product reads (`update_attention_value_product`). Each needs only the new
    logits k_S q^T and its row's log-sum-exp over all keys, kept as running sums (shift m_i
    and denominator Z_i, log-sum-exp = m_i + log Z_i) and updated exactly, as the exact level
    updates its sums: every row swaps the old keys' share for the new keys'; the changed
    queries' rows, and rows whose denominator fell below `UNDERFLOW` (their precision lost),
    are recomputed over all keys. From s = N / 3 on, every row's log-sum-exp is recomputed
    from all logits instead.
    old_keys, old_values (H, s, dh) are the changed tokens' keys and values before the change;
    q, k, v (H, N, dh) hold the new ones. Cost: 5 s N dh per head (at most N^2 dh + 2 s N dh).
    Returns how many underflowed rows were recomputed. A bias (`bias_for`) enters every logit
    the update computes: the changed keys' columns for all rows, and the recomputed rows.
    """
    tokens = q.shape[1]
    if index.numel() == 0:
        return 0
    queries_by_column = q.transpose(1, 2)
    recomputed = 0
    if exact_update_is_dense(index.numel(), tokens):
        logits_by_key = torch.matmul(k, queries_by_column)
        if bias_for is not None:
            logits_by_key += bias_for(None, None).transpose(1, 2)
        shift.copy_(torch.logsumexp(logits_by_key, dim=1))
        denominator.fill_(1.0)
        new_logits = logits_by_key.index_select(1, index)
    else:
        new_logits = torch.matmul(k.index_select(1, index), queries_by_column)
        old_logits = torch.matmul(old_keys, queries_by_column)
        if bias_for is not None:
            columns_bias = bias_for(None, index).transpose(1, 2)  # (H, s, N), key-major
            new_logits += columns_bias
            old_logits += columns_bias
        # The old keys' share is part of Z_i, so exp(old logit - m_i) <= Z_i: no overflow.
        raised = torch.maximum(shift, new_logits.amax(dim=1))
        by_row = raised.unsqueeze(1)
        denominator.mul_(torch.exp(shift - raised))
        denominator.add_((new_logits - by_row).exp_().sum(dim=1))
        denominator.sub_(old_logits.sub_(by_row).exp_().sum(dim=1))
        shift.copy_(raised)
        _recompute_logsumexp_rows(denominator, shift, q, k, index, bias_for)
        underflowed = _rows_that_lost_precision(denominator)
        if underflowed.numel() > 0:
            _recompute_logsumexp_rows(denominator, shift, q, k, underflowed, bias_for)
        recomputed = underflowed.numel()
    logsumexp = shift + torch.log(denominator)
    new_columns_by_key = new_logits.sub_(logsumexp.unsqueeze(1)).exp_()
    update_attention_value_product(
        product, new_columns_by_key, reference_by_key, v.index_select(1, index), old_values, index
    )
    return recomputed


def _rows_that_lost_precision(denominator: Tensor) -> Tensor:
    """Query rows (r,) whose running denominator (H, N) fell below `UNDERFLOW` in any head."""
    return (denominator < UNDERFLOW).any(dim=0).nonzero().squeeze(1)


def _recompute_logsumexp_rows(
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    k: Tensor,
    rows: Tensor,
    bias_for: BiasFor | None = None,
) -> None:
    """Set the running sums of the query rows `rows` to their log-sum-exp over all keys."""
    logits = torch.matmul(q.index_select(1, rows), k.transpose(1, 2))
    if bias_for is not None:
        logits += bias_for(rows, None)
    shift.index_copy_(1, rows, torch.logsumexp(logits, dim=-1))
    denominator.index_fill_(1, rows, 1.0)


def _swap_row_contributions(
    numerator: Tensor,
    denominator: Tensor,
    shift: Tensor,
    new_output: Tensor,
    new_logsumexp: Tensor,
    old_output: Tensor,
    old_logsumexp: Tensor,
) -> None:
    """Running softmax sums of every row: remove the old keys' share, add the new keys'.

    A key set's share of row i is exp(lse_i - m_i) in the denominator (H, N) (lse: the row's
    log-sum-exp over those keys) and that times its attention output in the numerator
    (H, N, dh). The shift m_i is first raised to cover the new share, so no exponent overflows.
    """
    raised = torch.maximum(shift, new_logsumexp)
    rescale = torch.exp(shift - raised)
    denominator.mul_(rescale)
    shift.copy_(raised)
    new_weight = torch.exp(new_logsumexp - raised)
    old_weight = torch.exp(old_logsumexp - raised)
    denominator.add_(new_weight).sub_(old_weight)
    numerator.mul_(rescale.unsqueeze(-1))
    numerator.addcmul_(new_weight.unsqueeze(-1), new_output)
    numerator.addcmul_(old_weight.unsqueeze(-1), old_output, value=-1)


def attention_with_logsumexp(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Softmax attention (..., H, Nq, dh) of q over k, v, and each row's log-sum-exp
    (..., H, Nq); `bias` (..., H, Nq, Nk), if given, is added to the logits.

    On the CPU this is one fused flash-attention call that never materialises the logits.
    """
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
        single = q.dim() == 3
        if single:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            bias = None if bias is None else bias.unsqueeze(0)
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=1.0
        )[:2]
        return (output[0], logsumexp[0]) if single else (output, logsumexp)
    logits = torch.matmul(q, k.transpose(-1, -2))
    if bias is not None:
        logits = logits + bias
    logsumexp = torch.logsumexp(logits, dim=-1)
    return torch.matmul(torch.exp(logits - logsumexp.unsqueeze(-1)), v), logsumexp


def dense_attention_cost(
    length: int, dim: int, heads: int, bias_sides: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(Multiply-accumulates, adds) of attention over one group of `length` tokens, every row:
    q k^T and A v (2 L^2 D); a decomposed relative position bias on a grid with these sides
    adds each row's table products (L (R + C) D) and two adds per logit and head."""
    macs, adds = 2 * length * length * dim, 0
    if bias_sides is not None:
        macs += length * sum(bias_sides) * dim
        adds += 2 * heads * length * length
    return macs, adds


def exact_update_cost(
    length: int,
    selected: int,
    recomputed: int,
    dim: int,
    heads: int,
    bias_sides: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """(Multiply-accumulates, adds) of `update_exact_attention` on one group of `length` tokens
    with `selected` changed tokens and `recomputed` underflowed rows: old and new logits and
    values of the changed keys in every row (4 L s D), the changed and underflowed rows over
    all keys (2 (s + u) L D), the running sums (3 L D + 3 L H adds); a bias adds its table
    products for the columns' rows (L (R + C) D, shared by old and new) and for the recomputed
    rows, and two adds per biased logit and head."""
    if selected == 0:
        return 0, 0
    if exact_update_is_dense(selected, length):
        return dense_attention_cost(length, dim, heads, bias_sides)
    rows = selected + recomputed
    macs = 4 * length * selected * dim + 2 * rows * length * dim
    adds = 3 * length * dim + 3 * length * heads
    if bias_sides is not None:
        macs += (length + rows) * sum(bias_sides) * dim
        adds += 2 * heads * (length * selected + rows * length)
    return macs, adds


def query_key_update_cost(
    length: int, selected: int, dim: int, heads: int, bias_sides: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(Multiply-accumulates, adds) of `update_query_key_product` on one group of `length`
    tokens with `selected` changed: rows and columns (2 s L D); a bias adds the table products
    of the changed rows and of every row for the changed columns ((s + L) (R + C) D) and two
    adds per rewritten logit and head."""
    if selected == 0:
        return 0, 0
    macs, adds = 2 * selected * length * dim, 0
    if bias_sides is not None:
        macs += (selected + length) * sum(bias_sides) * dim
        adds += 4 * heads * selected * length
    return macs, adds


def full_update_cost(
    length: int,
    selected: int,
    recomputed: int,
    dim: int,
    heads: int,
    bias_sides: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """(Multiply-accumulates, adds) of `update_full_attention` on one group of `length` tokens
    with `selected` changed keys and `recomputed` underflowed rows, the delta gate on the
    changed columns (s D + H L s) and the two accumulations into the product included (as
    `ops.eventful_block_macs` counts the full level); a bias adds the table products of every
    row for the changed columns and of the recomputed rows, and two adds per biased logit and
    head."""
    if selected == 0:
        return 0, 0
    side = 0 if bias_sides is None else sum(bias_sides)
    bias_adds_per_logit = 0 if bias_sides is None else 2 * heads
    if exact_update_is_dense(selected, length):
        macs = length * length * dim + 2 * length * selected * dim + length * side * dim
        adds = bias_adds_per_logit * length * length
    else:
        rows = selected + recomputed
        macs = 4 * length * selected * dim + rows * length * dim + (length + rows) * side * dim
        adds = 3 * length * heads + bias_adds_per_logit * (length * selected + rows * length)
    return macs + selected * dim + heads * length * selected, adds + 2 * length * dim


def exact_update_is_dense(selected: int, tokens: int) -> bool:
    """Whether the exact level recomputes every row: its incremental update costs 6 s N dh per
    head, a dense recompute 2 N^2 dh, so from s = N / 3 on the recompute is cheaper."""
    return 3 * selected >= tokens


def recompute_attention_rows(
    numerator: Tensor,
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: Tensor,
    bias_for: BiasFor | None = None,
) -> None:
    """Attention of the queries `rows` over all keys, written into the running sums.

    numerator (H, N, dh) holds U_i = sum_j exp(l_ij - m_i) v_j, denominator (H, N) Z_i and shift
    (H, N) m_i, with logits l_ij = q_i . k_j (plus the bias, if any); the attention output of
    row i is U_i / Z_i. With the shift at the row's log-sum-exp, U_i is the attention output and
    Z_i is 1.
    """
    if rows.numel() == q.shape[1]:  # every row (the indices are distinct): no gather, no scatter
        bias = None if bias_for is None else bias_for(None, None)
        output, logsumexp = attention_with_logsumexp(q, k, v, bias)
        numerator.copy_(output)
        denominator.fill_(1.0)
        shift.copy_(logsumexp)
        return
    bias = None if bias_for is None else bias_for(rows, None)
    output, logsumexp = attention_with_logsumexp(q.index_select(1, rows), k, v, bias)
    numerator.index_copy_(1, rows, output)
    denominator.index_fill_(1, rows, 1.0)
    shift.index_copy_(1, rows, logsumexp)


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
    bias_for: BiasFor | None = None,
) -> int:
    """Exact incremental attention (DESIGN.md, "Beyond the paper"): no N x N cache or softmax.

    The tokens `index` (s,) changed: `old_keys`, `old_values` (H, s, dh) are their keys and
    values before the change, q, k, v (H, N, dh) hold the new ones. Every row swaps the old
    contribution of those keys for the new one (each computed as fused attention over the s
    keys, rescaled by its log-sum-exp), after raising its shift to the new log-sum-exp so that
    no exponent overflows; the changed queries' rows are recomputed over all keys; rows whose
    denominator fell below `UNDERFLOW` are recomputed too (finding them reads one count back
    from the device). From s = N / 3 on, every row is recomputed instead, which costs less.
    Cost: 6 s N dh per head, at most 2 N^2 dh. Returns how many underflowed rows were
    recomputed.

    With a bias (`bias_for`), the changed keys' columns take the bias of every row for those
    columns, once for the old and the new contributions (it depends on the query and the
    positions only, and the rows whose query changed are recomputed), and recomputed rows take
    their rows' bias.
    """
    tokens = q.shape[1]
    if index.numel() == 0:
        return 0
    if exact_update_is_dense(index.numel(), tokens):
        recompute_attention_rows(
            numerator, denominator, shift, q, k, v, torch.arange(tokens), bias_for
        )
        return 0
    columns_bias = None if bias_for is None else bias_for(None, index)
    new_output, new_logsumexp = attention_with_logsumexp(
        q, k.index_select(1, index), v.index_select(1, index), columns_bias
    )
    old_output, old_logsumexp = attention_with_logsumexp(q, old_keys, old_values, columns_bias)
    _swap_row_contributions(
        numerator, denominator, shift, new_output, new_logsumexp, old_output, old_logsumexp
    )
    recompute_attention_rows(numerator, denominator, shift, q, k, v, index, bias_for)
    underflowed = _rows_that_lost_precision(denominator)
    if underflowed.numel() > 0:
        recompute_attention_rows(numerator, denominator, shift, q, k, v, underflowed, bias_for)
    return underflowed.numel()


def update_exact_attention_batch(
    numerator: Tensor,
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    old_keys: Tensor,
    old_values: Tensor,
    index: Tensor,
) -> list[int]:
    """`update_exact_attention` for a batch of streams that changed equally many tokens, with
    one call per operation for the whole batch (no loop over streams).

    numerator (B, H, N, dh), denominator and shift (B, H, N); q, k, v (B, H, N, dh); old_keys,
    old_values (B, H, s, dh); index (B, s). The same arithmetic and cost, per stream, as
    `update_exact_attention`; only streams with underflowed rows are visited one by one, to
    recompute those rows. Returns each stream's count of underflowed rows recomputed.
    """
    batch, heads, tokens, dim = q.shape
    if exact_update_is_dense(index.shape[1], tokens):
        output, logsumexp = attention_with_logsumexp(q, k, v)
        numerator.copy_(output)
        denominator.fill_(1.0)
        shift.copy_(logsumexp)
        return [0] * batch
    by_row = index[:, None, :].expand(batch, heads, -1)
    by_element = index[:, None, :, None].expand(batch, heads, -1, dim)
    new_output, new_logsumexp = attention_with_logsumexp(
        q, k.gather(2, by_element), v.gather(2, by_element)
    )
    old_output, old_logsumexp = attention_with_logsumexp(q, old_keys, old_values)
    _swap_row_contributions(
        numerator, denominator, shift, new_output, new_logsumexp, old_output, old_logsumexp
    )
    output, logsumexp = attention_with_logsumexp(q.gather(2, by_element), k, v)
    numerator.scatter_(2, by_element, output)
    denominator.scatter_(2, by_row, 1.0)
    shift.scatter_(2, by_row, logsumexp)
    lost = (denominator < UNDERFLOW).any(dim=1)  # (B, N): rows that lost precision
    counts = [0] * batch
    if bool(lost.any()):
        for stream in lost.any(dim=1).nonzero().squeeze(1).tolist():
            rows = lost[stream].nonzero().squeeze(1)
            sums = (numerator[stream], denominator[stream], shift[stream])
            recompute_attention_rows(*sums, q[stream], k[stream], v[stream], rows)
            counts[stream] = rows.numel()
    return counts


# A row's denominator falls when the keys that dominated it change and drop: the update then
# subtracts their old share, nearly all of the sum, and the difference keeps only the digits
# that survive the cancellation (float32: about 7 minus log10 of the drop). Below this bound
# (the sum fell 1000-fold from its value at the last recompute, about 1) the row is recomputed
# over all keys, which keeps rows to about 1e-4 relative error. A stricter bound near float
# underflow (1e-20) let rows of real video drift by orders of magnitude (BENCHMARKS.md,
# "camera-motion", attention error).
UNDERFLOW = 1e-3
