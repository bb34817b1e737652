"""Spatial redundancy by key/value pooling (a baseline, as in K/V pooling of PVT and MViT):
in global attention, every query attends to the prefix tokens' keys and values and to the
patches' keys and values averaged over factor x factor cells of the patch grid. A factor of 1
is ordinary attention.

In the eventful engine it combines with the tokenwise level, which computes attention over
every query each step from the buffered q, k and v; the other levels keep per-key caches that
pooling would break (`EventfulViT.kv_pooling`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_factor(factor: int) -> None:
    """Refuse a factor that is not a positive integer."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"the K/V pooling factor must be a positive integer, got {factor!r}")


def check_pooling(factor: int, grid: tuple[int, int]) -> None:
    """Refuse a factor that is not a positive integer or does not divide the patch grid."""
    check_factor(factor)
    rows, cols = grid
    if rows % factor or cols % factor:
        raise ValueError(
            f"a K/V pooling factor of {factor} does not divide the {rows}x{cols} patch grid"
        )


def pool_keys_values(
    keys: Tensor, values: Tensor, grid: tuple[int, int], factor: int
) -> tuple[Tensor, Tensor]:
    """Keys and values (B, H, P + rows * cols, dh), the P prefix tokens first, -> the prefix's
    and the patches' averaged over factor x factor cells: (B, H, P + rows * cols / factor^2,
    dh)."""
    if factor == 1:
        return keys, values
    rows, cols = grid
    prefix = keys.shape[2] - rows * cols

    def pool(tensor: Tensor) -> Tensor:
        batch, heads, _, head_dim = tensor.shape
        patches = tensor[:, :, prefix:].reshape(batch * heads, rows, cols, head_dim)
        pooled = F.avg_pool2d(patches.permute(0, 3, 1, 2), factor)
        pooled = pooled.flatten(2).transpose(1, 2).reshape(batch, heads, -1, head_dim)
        return torch.cat([tensor[:, :, :prefix], pooled], dim=2)

    return pool(keys), pool(values)


def pooled_attention_macs(
    num_tokens: int, dim: int, grid: tuple[int, int], factor: int
) -> tuple[int, int]:
    """Multiply-accumulates and adds of one stream's pooled attention: every query against the
    m = P + rows * cols / factor^2 keys and values (2 n m d), and the averaging of the patches'
    keys and values (2 rows * cols * d adds)."""
    rows, cols = grid
    prefix = num_tokens - rows * cols
    keys = prefix + rows * cols // (factor * factor)
    adds = 2 * rows * cols * dim if factor > 1 else 0
    return 2 * num_tokens * keys * dim, adds
