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
