"""Incremental attention products over attention groups: q, k, v of shape (G, H, L, dh).

A group is one stream's tokens under global attention, or one window of a stream. Every
function updates all the groups it is given with one call per operation, whatever each group
changed: `Changes` pads each group's changed positions to the largest count with positions that
did not change, and the updates leave those untouched. The functions named for one stream
(`update_exact_attention`, ...) take (H, N, dh) and an index (s,): a single group.

The query scale is folded into the q projection, so logits are plain q . k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from eventful.core import kernels

# An attention bias: bias_for(rows, columns) gives the logits' additive term (G, H, r, c) of
# each group's query rows `rows` (G, r) over its key columns `columns` (G, c), both index
# tensors into the group's positions (None: all of them).
BiasFor = Callable[[Tensor | None, Tensor | None], Tensor]


@dataclass(frozen=True)
class Changes:
    """The changed positions of G groups, padded to one count: index (G, m), valid (G, m).

    Row g of `index` holds group g's changed positions, then positions that did not change, so
    that every row has m = the largest count of changes; `valid` marks the changed ones. The
    positions of a row are distinct. A padding position's key and value are the same before and
    after the step, so swapping its old share of a row's attention for its new one changes
    nothing (up to rounding), and the updates write nothing for it. A single group's one row
    is as long as its count of changes: it holds no padding.
    """

    index: Tensor
    valid: Tensor

    @property
    def padding_mask(self) -> Tensor | None:
        """`valid`, or None for a single group (no padding), whose writes need no mask."""
        return None if self.index.shape[0] == 1 else self.valid

    @staticmethod
    def from_mask(changed: Tensor) -> Changes:
        """From a (G, L) bool mask of changed positions."""
        counts = changed.sum(dim=1)
        width = int(counts.max()) if counts.numel() else 0
        # Changed positions first, each part in ascending order (a stable sort).
        order = changed.to(torch.uint8).argsort(dim=1, descending=True, stable=True)
        valid = torch.arange(width, device=changed.device) < counts.unsqueeze(1)
        return Changes(order[:, :width], valid)

    @staticmethod
    def of_one_group(index: Tensor) -> Changes:
        """The positions `index` (s,) of a single group, all changed."""
        valid = torch.ones(1, index.numel(), dtype=torch.bool, device=index.device)
        return Changes(index.unsqueeze(0), valid)


def at_positions(x: Tensor, index: Tensor) -> Tensor:
    """x (G, H, L, ...) at each group's positions index (G, m) along L: (G, H, m, ...)."""
    if x.shape[0] == 1:  # one group: a plain index_select, no expanded index
        return x.index_select(2, index[0])
    groups, heads = x.shape[:2]
    shape = (groups, heads, index.shape[1], *x.shape[3:])
    by_position = index.view(groups, 1, -1, *([1] * (x.dim() - 3))).expand(shape)
    return x.gather(2, by_position)


def _write_positions(x: Tensor, index: Tensor, values: Tensor, valid: Tensor | None) -> None:
    """x (G, H, L, ...) at index (G, m) takes `values` (G, H, m, ...) where `valid` (G, m);
    `valid` None (`Changes.padding_mask` of one group): everywhere, by a plain index_copy_."""
    if valid is None:
        x[0].index_copy_(1, index[0], values[0].to(x.dtype))
        return
    by_head = valid.view(valid.shape[0], 1, valid.shape[1], *([1] * (x.dim() - 3)))
    kept = torch.where(by_head, values.to(x.dtype), at_positions(x, index))
    shape = kept.shape
    x.scatter_(2, index.view(shape[0], 1, -1, *([1] * (x.dim() - 3))).expand(shape), kept)


def query_key_product(q: Tensor, k: Tensor, bias: Tensor | None = None) -> Tensor:
    """All logits (..., H, N, N): q k^T, plus the bias if any."""
    logits = torch.matmul(q, k.transpose(-1, -2))
    return logits if bias is None else logits + bias


def update_query_key_groups(
    logits: Tensor, q: Tensor, k: Tensor, changes: Changes, bias_for: BiasFor | None = None
) -> None:
    """Cached query-key products (G, H, L, L): new queries rewrite rows, new keys columns.

    q, k: (G, H, L, dh), already holding the new rows. Afterwards logits == q k^T (plus the
    bias, if any, for exactly the rows and columns rewritten); padding positions are left as
    they were. Cost: 2 s L dh per head and group.
    """
    index, valid = changes.index, changes.padding_mask
    rows = torch.matmul(at_positions(q, index), k.transpose(-1, -2))  # (G, H, m, L)
    if bias_for is not None:
        rows += bias_for(index, None)
    _write_positions(logits, index, rows, valid)
    columns = torch.matmul(q, at_positions(k, index).transpose(-1, -2))  # (G, H, L, m)
    if bias_for is not None:
        columns += bias_for(None, index)
    _write_positions(logits.transpose(-1, -2), index, columns.transpose(-1, -2), valid)


def update_query_key_product(
    logits: Tensor, q: Tensor, k: Tensor, index: Tensor, bias_for: BiasFor | None = None
) -> None:
    """`update_query_key_groups` for one group: logits (H, N, N), q, k (H, N, dh), index (s,)."""
    update_query_key_groups(
        logits.unsqueeze(0), q.unsqueeze(0), k.unsqueeze(0), Changes.of_one_group(index), bias_for
    )


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


def update_full_groups(
    product: Tensor,
    reference_by_key: Tensor,
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    old_keys: Tensor,
    old_values: Tensor,
    changes: Changes,
    bias_for: BiasFor | None = None,
    every_row: bool = False,
) -> Tensor:
    """The paper's full-level update, with no N x N softmax and no cached query-key product.

    Caches per group: the attention-value product (G, H, L, dh), the attention reference
    key-major (G, H, L keys, L queries), and each row's log-sum-exp as running sums (shift m_i
    and denominator Z_i (G, H, L), log-sum-exp = m_i + log Z_i). The attention columns A[:, S]
    of the changed keys are all the update reads: product += A[:, S] dV + dA V_old, with dV the
    change of their values and dA the change of their columns since the reference, which takes
    the new columns. Columns outside S keep their stale share: the paper's approximation.

    A column needs only the new logits k_S q^T and its row's log-sum-exp, updated exactly as
    the exact level updates its sums: every row swaps the old keys' share for the new keys'; the
    changed queries' rows, and rows whose denominator fell below `UNDERFLOW`, are recomputed
    over all keys. With `every_row` (from s = L / 3 on) every row's log-sum-exp is recomputed
    from all logits instead. old_keys, old_values (G, H, m, dh) are the changed positions' keys
    and values before the change; q, k, v hold the new ones. A bias enters every logit the
    update computes. Cost: 5 s L dh per head (at most L^2 dh + 2 s L dh). Returns per group
    (G,) the underflowed rows recomputed.

    On the CPU in float32 without a bias one kernel of our own does all of it
    (`kernels.full_attention_update`); it raises each row's shift as the exact level's swap
    does, so its shift and denominator differ from these operators' while their log-sum-exp,
    the product and the reference agree up to rounding.
    """
    index = changes.index
    if bias_for is None:
        caches = (product, reference_by_key, denominator, shift)
        kernel = _full_update_kernel(*caches, q, k, v, old_keys, old_values, index)
        if kernel is not None:
            changed = [t.contiguous() for t in (old_keys, old_values, index, changes.valid)]
            return kernel(*caches, q, k, v, *changed, UNDERFLOW, every_row)
    queries_by_column = q.transpose(-1, -2)
    lost = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    if every_row:
        logits_by_key = torch.matmul(k, queries_by_column)
        if bias_for is not None:
            logits_by_key += bias_for(None, None).transpose(-1, -2)
        shift.copy_(torch.logsumexp(logits_by_key, dim=-2))
        denominator.fill_(1.0)
        new_logits = at_positions(logits_by_key, index)
    else:
        new_logits = torch.matmul(at_positions(k, index), queries_by_column)  # (G, H, m, L)
        old_logits = torch.matmul(old_keys, queries_by_column)
        if bias_for is not None:
            columns_bias = bias_for(None, index).transpose(-1, -2)  # key-major
            new_logits += columns_bias
            old_logits += columns_bias
        # The old keys' share is part of Z_i, so exp(old logit - m_i) <= Z_i: no overflow.
        raised = torch.maximum(shift, new_logits.amax(dim=-2))
        by_row = raised.unsqueeze(-2)
        denominator.mul_(torch.exp(shift - raised))
        denominator.add_((new_logits - by_row).exp_().sum(dim=-2))
        denominator.sub_(old_logits.sub_(by_row).exp_().sum(dim=-2))
        shift.copy_(raised)
        sums = (denominator, shift, q, k)
        _recompute_logsumexp_rows(*sums, changes, bias_for)
        lost = _recompute_lost_rows(denominator, lambda rows: _recompute_logsumexp_rows(
            *sums, rows, bias_for
        ))  # fmt: skip
    logsumexp = shift + torch.log(denominator)
    new_columns = new_logits.sub_(logsumexp.unsqueeze(-2)).exp_()
    reference_at = at_positions(reference_by_key, index)
    padding = changes.padding_mask
    if padding is not None:  # a padding position's column keeps its reference: no change
        new_columns = torch.where(padding[:, None, :, None], new_columns, reference_at)
    attention_delta = new_columns - reference_at
    _write_positions(reference_by_key, index, new_columns, padding)
    new_values = at_positions(v, index)
    flat_product = product.view(-1, *product.shape[2:])
    flat_product.baddbmm_(
        new_columns.flatten(0, 1).transpose(1, 2), (new_values - old_values).flatten(0, 1)
    )
    flat_product.baddbmm_(attention_delta.flatten(0, 1).transpose(1, 2), old_values.flatten(0, 1))
    return lost


def _full_update_kernel(
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
) -> Callable[..., Tensor] | None:
    """The CPU kernel of `update_full_groups` where it applies (float32 CPU tensors, the caches
    contiguous, the rows of q, k, v contiguous, int64 positions, outside autograd and
    `torch.compile`), else None."""
    caches = (product, reference_by_key, denominator, shift)
    if not kernels.can_take(*caches, q, k, v, old_keys, old_values) or index.dtype != torch.long:
        return None
    if not all(t.is_contiguous() for t in caches) or any(t.stride(-1) != 1 for t in (q, k, v)):
        return None
    return kernels.full_attention_update()


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
    """`update_full_groups` for one group: caches and q, k, v (H, N, ...), the changed tokens
    `index` (s,), old keys and values (H, s, dh); from s = N / 3 on, every row's log-sum-exp
    is recomputed. Returns how many underflowed rows were recomputed."""
    if index.numel() == 0:
        return 0
    one_group = [t.unsqueeze(0) for t in (product, reference_by_key, denominator, shift)]
    one_group += [t.unsqueeze(0) for t in (q, k, v, old_keys, old_values)]
    every_row = full_update_is_dense(index.numel(), q.shape[1])
    lost = update_full_groups(*one_group, Changes.of_one_group(index), bias_for, every_row)
    return int(lost[0])


def _recompute_logsumexp_rows(
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    k: Tensor,
    rows: Changes,
    bias_for: BiasFor | None = None,
) -> None:
    """Set the running sums (G, H, L) of each group's rows `rows` to their log-sum-exp over all
    its keys."""
    logits = torch.matmul(at_positions(q, rows.index), k.transpose(-1, -2))
    if bias_for is not None:
        logits += bias_for(rows.index, None)
    logsumexp = torch.logsumexp(logits, dim=-1)
    _write_positions(shift, rows.index, logsumexp, rows.padding_mask)
    _write_positions(denominator, rows.index, torch.ones_like(logsumexp), rows.padding_mask)


def _recompute_lost_rows(denominator: Tensor, recompute: Callable[[Changes], None]) -> Tensor:
    """Recompute (with `recompute`) the rows whose running denominator (G, H, L) fell below
    `UNDERFLOW` in any head; returns their count per group (G,). Finding them reads one value
    back from the device."""
    lost = (denominator < UNDERFLOW).any(dim=1)
    counts = lost.sum(dim=1)
    if bool(counts.any()):
        recompute(Changes.from_mask(lost))
    return counts


def _swap_key_contributions(
    numerator: Tensor,
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    new_keys: Tensor,
    new_values: Tensor,
    old_keys: Tensor,
    old_values: Tensor,
    columns_bias: Tensor | None = None,
) -> None:
    """Running softmax sums of every row: remove the old keys' share, add the new keys'.

    Row i's share of key j is exp(l_ij - m_i) in the denominator (..., H, L) and that times v_j
    in the numerator (..., H, L, dh). The shift m_i is first raised to the log-sum-exp of the
    row's new logits, so that no exponent overflows (an old key's share was already in the sums
    under a shift at most as high) and the denominator keeps the scale that `UNDERFLOW` is
    measured against (about 1 after a recompute). Old and new keys go through one matmul for
    their logits and one for their values, the old keys' weights negated: plain batched
    matmuls, which for a few keys cost less here than a fused attention call per key set.
    On the CPU in float32 one kernel of our own does all of it (`kernels.swap_key_contributions`),
    row by row.
    """
    changed = (new_keys, new_values, old_keys, old_values, columns_bias)
    kernel = _swap_kernel(numerator, denominator, shift, q, *changed)
    if kernel is not None:
        changed = [None if t is None else t.contiguous() for t in changed]
        kernel(numerator, denominator, shift, q, *changed)
        return
    count = new_keys.shape[-2]
    keys = torch.cat((new_keys, old_keys), dim=-2)
    logits = torch.matmul(q, keys.transpose(-1, -2))  # (..., H, L, 2 m)
    if columns_bias is not None:
        logits += torch.cat((columns_bias, columns_bias), dim=-1)
    raised = torch.maximum(shift, torch.logsumexp(logits[..., :count], dim=-1))
    weights = logits.sub_(raised.unsqueeze(-1)).exp_()
    weights[..., count:].neg_()
    rescale = shift.sub_(raised).exp_()
    denominator.mul_(rescale).add_(weights.sum(dim=-1))
    values = torch.cat((new_values, old_values), dim=-2)
    numerator.mul_(rescale.unsqueeze(-1)).add_(torch.matmul(weights, values))
    shift.copy_(raised)


def _swap_kernel(
    numerator: Tensor, denominator: Tensor, shift: Tensor, *inputs: Tensor | None
) -> Callable[..., None] | None:
    """The CPU kernel of `_swap_key_contributions` where it applies (float32 CPU tensors, the
    sums contiguous, q's rows contiguous, outside autograd and `torch.compile`), else None."""
    sums = (numerator, denominator, shift)
    if not kernels.can_take(*sums, *(t for t in inputs if t is not None)):
        return None
    if not all(t.is_contiguous() for t in sums) or inputs[0].stride(-1) != 1:
        return None
    return kernels.swap_key_contributions()


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Softmax attention (G, H, Nq, dh) of q over k, v (G, H, L, dh); `bias`, if given, is added
    to the logits (broadcast to (G, H, Nq, L)). The logits take no scale: it is folded into q.

    Float32 CPU tensors outside autograd and `torch.compile` run the engine's kernel
    (`kernels.attention_rows`), which writes the output with its heads side by side, so that
    (G, Nq, H dh) is a view; everything else runs PyTorch's fused attention. With `dtype`
    (bfloat16, the attention of a model converted at precision "bf16"), the inputs are rounded
    to it and PyTorch's fused attention runs in it (AMX or AVX512-BF16 where the CPU has them);
    the output returns in q's dtype."""
    if dtype is not None and dtype != q.dtype:
        mask = None if bias is None else bias.to(dtype)
        low = [t.to(dtype) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*low, attn_mask=mask, scale=1.0).to(q.dtype)
    kernel = _attention_rows_kernel(q, k, v, bias)
    if kernel is not None:
        return kernel(q, k, v, _full_bias(bias, q, k))[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def bfloat16_attention_kernel(q: Tensor, k: Tensor, v: Tensor) -> Callable | None:
    """The engine's kernel of attention over every row in bfloat16 on AMX tiles
    (`kernels.bfloat16_attention`: float32 output, and each row's log-sum-exp) where it applies
    to q, k, v (G, H, N, dh) without a bias and pays (`kernels.bfloat16_attention_pays`: heads
    of 64 features, sequences up to a few hundred tokens, a CPU and process with the tiles):
    bfloat16 CPU tensors of one shape with contiguous features, outside autograd and
    `torch.compile`; else None (PyTorch's fused attention runs)."""
    if q.dtype != torch.bfloat16 or q.dim() != 4 or q.device.type != "cpu":
        return None
    if not kernels.bfloat16_attention_pays(q.shape[2], q.shape[3]):
        return None
    if k.shape != q.shape or v.shape != q.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    if any(t.stride(-1) != 1 for t in (q, k, v)) or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return None
    return kernels.bfloat16_attention()


def attention_with_logsumexp(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Softmax attention (..., H, Nq, dh) of q over k, v, and each row's log-sum-exp
    (..., H, Nq); `bias` (..., H, Nq, Nk), if given, is added to the logits.

    On the CPU this is one call that never materialises the logits: the engine's kernel where
    `softmax_attention` runs it, else PyTorch's fused flash attention. With `dtype` (bfloat16),
    the inputs are rounded to it and the products run in it, as `softmax_attention` does; the
    output returns in q's dtype and the log-sum-exp in float32 (or q's dtype if wider).
    """
    single = q.dim() == 3
    if single:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        bias = None if bias is None else bias.unsqueeze(0)
    if dtype is not None and dtype != q.dtype:
        low = [t.to(dtype) for t in (q, k, v)]
        output, logsumexp = _attention_with_logsumexp(
            *low, None if bias is None else bias.to(dtype)
        )
        output, logsumexp = output.to(q.dtype), logsumexp.to(q.dtype)
    else:
        output, logsumexp = _attention_with_logsumexp(q, k, v, bias)
    return (output[0], logsumexp[0]) if single else (output, logsumexp)


def _attention_with_logsumexp(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    kernel = _attention_rows_kernel(q, k, v, bias)
    if kernel is not None:
        return kernel(q, k, v, _full_bias(bias, q, k))
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16):
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=1.0
        )[:2]
        return output, logsumexp
    logits = torch.matmul(q, k.transpose(-1, -2))
    if bias is not None:
        logits = logits + bias
    logsumexp = torch.logsumexp(logits, dim=-1)
    return torch.matmul(torch.exp(logits - logsumexp.unsqueeze(-1)), v), logsumexp


def _attention_rows_kernel(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None
) -> Callable[..., tuple[Tensor, Tensor]] | None:
    """The CPU kernel of attention where it applies (float32 CPU tensors (G, H, rows, dh) with
    a contiguous last dimension, a bias of the logits' last size or none, outside autograd and
    `torch.compile`), else None."""
    if not kernels.can_take(q, k, v, *([] if bias is None else [bias])):
        return None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[-2] == 0:
        return None
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return None
    if bias is not None and (bias.shape[-1] != k.shape[-2] or bias.stride(-1) != 1):
        return None
    return kernels.attention_rows()


def _full_bias(bias: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """The bias broadcast to (G, H, Nq, L), as views."""
    return None if bias is None else bias.expand(*q.shape[:-1], k.shape[-2])


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
    if full_update_is_dense(selected, length):
        macs = length * length * dim + 2 * length * selected * dim + length * side * dim
        adds = bias_adds_per_logit * length * length
    else:
        rows = selected + recomputed
        macs = 4 * length * selected * dim + rows * length * dim + (length + rows) * side * dim
        adds = 3 * length * heads + bias_adds_per_logit * (length * selected + rows * length)
    return macs + selected * dim + heads * length * selected, adds + 2 * length * dim


def exact_update_is_dense(selected: int | Tensor, tokens: int) -> bool | Tensor:
    """Whether the exact level recomputes every row: from s = N / 5 changed positions on.

    Its incremental update costs 6 s N dh per head, a recompute 2 N^2 dh, which would put the
    switch at N / 3. But a recompute is one attention call close to this machine's multiply-add
    peak (`kernels.attention_rows`), while the update's swap and bookkeeping are further from
    theirs: measured interleaved (CPU, 2 threads), the recompute is as fast from about N / 6.5
    (ViT-S/14 at 224) and N / 5.5 (ViT-B/16 at 384) on. Elementwise for a tensor of counts."""
    return selected >= exact_dense_from(tokens)


def exact_dense_from(tokens: int) -> int:
    """The fewest changed positions of a group of `tokens` from which the exact level recomputes
    every row: N / 5, rounded up (`exact_update_is_dense`)."""
    return (tokens + 4) // 5


def full_update_is_dense(selected: int | Tensor, tokens: int) -> bool | Tensor:
    """Whether the full level recomputes every row's log-sum-exp from all logits: its running
    sums cost 3 s N dh per head (the changed keys' old and new logits, the changed rows), a
    recompute N^2 dh, so from s = N / 3 on. Elementwise for a tensor of counts."""
    return 3 * selected >= tokens


def recompute_exact_groups(
    numerator: Tensor,
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Every row of the exact level's running sums (..., H, L, ...) recomputed: U_i is the
    attention output, Z_i is 1 and m_i the row's log-sum-exp; `bias` is added to the logits;
    `dtype`: the attention's products run in it (`attention_with_logsumexp`), the sums keep
    theirs. Returns the attention output as computed (the numerator's values): in q's dtype, or
    in float32 from the bfloat16 kernel (`bfloat16_attention_kernel`) where it runs."""
    kernel = None if bias is not None or dtype is not None else bfloat16_attention_kernel(q, k, v)
    if kernel is not None:
        output, logsumexp = kernel(q, k, v)
    else:
        output, logsumexp = attention_with_logsumexp(q, k, v, bias, dtype)
    numerator.copy_(output)
    denominator.fill_(1.0)
    shift.copy_(logsumexp)
    return output


def recompute_attention_groups(
    numerator: Tensor,
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: Changes,
    bias_for: BiasFor | None = None,
) -> None:
    """Attention of each group's query rows `rows` over all its keys, written into the running
    sums.

    numerator (G, H, L, dh) holds U_i = sum_j exp(l_ij - m_i) v_j, denominator (G, H, L) Z_i and
    shift m_i, with logits l_ij = q_i . k_j (plus the bias, if any); the attention output of
    row i is U_i / Z_i. With the shift at the row's log-sum-exp, U_i is the attention output and
    Z_i is 1.
    """
    bias = None if bias_for is None else bias_for(rows.index, None)
    output, logsumexp = attention_with_logsumexp(at_positions(q, rows.index), k, v, bias)
    mask = rows.padding_mask
    _write_positions(numerator, rows.index, output, mask)
    _write_positions(denominator, rows.index, torch.ones_like(logsumexp), mask)
    _write_positions(shift, rows.index, logsumexp, mask)


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
    """`recompute_attention_groups` for one group: sums and q, k, v (H, N, ...), rows (r,)."""
    one_group = [t.unsqueeze(0) for t in (numerator, denominator, shift, q, k, v)]
    if rows.numel() == q.shape[1]:  # every row (the indices are distinct): no gather, no scatter
        bias = None if bias_for is None else bias_for(None, None)
        recompute_exact_groups(*one_group, bias)
        return
    recompute_attention_groups(*one_group, Changes.of_one_group(rows), bias_for)


def update_exact_groups(
    numerator: Tensor,
    denominator: Tensor,
    shift: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    old_keys: Tensor,
    old_values: Tensor,
    changes: Changes,
    bias_for: BiasFor | None = None,
) -> Tensor:
    """Exact incremental attention (DESIGN.md, "Beyond the paper"): no N x N cache or softmax.

    The positions `changes` changed: `old_keys`, `old_values` (G, H, m, dh) are their keys and
    values before the change, q, k, v (G, H, L, dh) hold the new ones. Every row swaps the old
    contribution of those keys for the new one, after raising its shift to the log-sum-exp of
    its new logits so that no exponent overflows (`_swap_key_contributions`); the changed
    queries' rows are recomputed over all keys; rows whose denominator fell below `UNDERFLOW`
    are recomputed too. Cost: 6 s L dh per head and group. Returns per group (G,) the
    underflowed rows recomputed.

    With a bias (`bias_for`), the changed keys' columns take the bias of every row for those
    columns, once for the old and the new contributions (it depends on the query and the
    positions only, and the rows whose query changed are recomputed), and recomputed rows take
    their rows' bias.
    """
    index = changes.index
    columns_bias = None if bias_for is None else bias_for(None, index)
    sums = (numerator, denominator, shift)
    new_keys, new_values = at_positions(k, index), at_positions(v, index)
    _swap_key_contributions(*sums, q, new_keys, new_values, old_keys, old_values, columns_bias)
    recompute_attention_groups(*sums, q, k, v, changes, bias_for)
    return _recompute_lost_rows(
        denominator, lambda rows: recompute_attention_groups(*sums, q, k, v, rows, bias_for)
    )


def update_exact_sequences(
    qkv: Tensor,
    rows: Tensor,
    flat: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    shift: Tensor,
    heads: int,
) -> tuple[Tensor, Tensor] | None:
    """One step of the exact level over attention of each stream's whole sequence (no bias), in
    one call of the CPU kernel (`kernels.exact_attention_update`): the selected tokens' new qkv
    rows (M, 3 D), at flat indices (M,) into the buffer qkv (B, N, 3 D) stream by stream, are
    written into it; each stream with changes updates its running sums as `update_exact_groups`
    does, or from `exact_dense_from` changes on recomputes every row. Returns the attention
    output (B, N, D) and per stream (B,) the underflowed rows recomputed; None where the kernel
    does not apply (not float32 tensors on the CPU, not contiguous, autograd, `torch.compile`),
    and then nothing is written."""
    sums = (numerator, denominator, shift)
    if not kernels.can_take(qkv, rows, *sums) or flat.dtype != torch.long:
        return None
    if not all(t.is_contiguous() for t in (qkv, rows, *sums)):
        return None
    kernel = kernels.exact_attention_update()
    if kernel is None:
        return None
    dense_from = exact_dense_from(qkv.shape[1])
    return kernel(qkv, rows, flat, *sums, heads, dense_from, UNDERFLOW)


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
    """`update_exact_groups` for one group: sums and q, k, v (H, N, ...), the changed tokens
    `index` (s,), old keys and values (H, s, dh). From s = N / 5 on, every row is recomputed
    instead, which costs less. Returns how many underflowed rows were recomputed."""
    tokens = q.shape[1]
    if index.numel() == 0:
        return 0
    if exact_update_is_dense(index.numel(), tokens):
        every = torch.arange(tokens, device=q.device)
        recompute_attention_rows(numerator, denominator, shift, q, k, v, every, bias_for)
        return 0
    one_group = [t.unsqueeze(0) for t in (numerator, denominator, shift, q, k, v)]
    old = (old_keys.unsqueeze(0), old_values.unsqueeze(0))
    lost = update_exact_groups(*one_group, *old, Changes.of_one_group(index), bias_for)
    return int(lost[0])


# A row's denominator falls when the keys that dominated it change and drop: the update then
# subtracts their old share, nearly all of the sum, and the difference keeps only the digits
# that survive the cancellation (float32: about 7 minus log10 of the drop). Below this bound
# (the sum fell 1000-fold from its value at the last recompute, about 1) the row is recomputed
# over all keys, which keeps rows to about 1e-4 relative error. A stricter bound near float
# underflow (1e-20) let rows of real video drift by orders of magnitude (BENCHMARKS.md,
# "camera-motion", attention error).
UNDERFLOW = 1e-3
