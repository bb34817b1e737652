"""Additive attention biases: a term added to the logits of each (query, key) pair.

Decomposed relative position (MViTv2, ViTDet): for a query at grid position (i, j) and a key
at (k, l), the bias is q . R_rows[i - k] + q . R_cols[j - l], with one learned table per axis
of 2 S - 1 offsets (S: the side of the grid it was trained for) by the head dimension. It
depends on the query, so it is computed from q for the rows that are computed; on another grid
size the tables are resampled linearly to 2 max(q, k) - 1 offsets, as ViTDet does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def relative_table(query_size: int, key_size: int, table: Tensor) -> Tensor:
    """Per (query position, key position) along one axis, its table row: (q, k, dh).

    The table (L, dh) is resampled linearly to 2 max(q, k) - 1 offsets if its length differs;
    positions of the shorter side are stretched to the longer one's scale.
    """
    offsets = 2 * max(query_size, key_size) - 1
    if table.shape[0] != offsets:
        resampled = F.interpolate(
            table.t().unsqueeze(0).float(), size=offsets, mode="linear", align_corners=False
        )
        table = resampled[0].t().to(table.dtype)
    query_stretch = max(key_size / query_size, 1.0)
    key_stretch = max(query_size / key_size, 1.0)
    query_coords = torch.arange(query_size, device=table.device)[:, None] * query_stretch
    key_coords = torch.arange(key_size, device=table.device)[None, :] * key_stretch
    relative = query_coords - key_coords + (key_size - 1) * key_stretch
    return table[relative.long()]


class DecomposedRelativePosition(nn.Module):
    """The decomposed relative position bias of one attention layer.

    rows, cols: the learned tables (2 S - 1, dh) for the vertical and horizontal offsets.
    """

    def __init__(self, rows: Tensor, cols: Tensor) -> None:
        super().__init__()
        if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] != cols.shape[1]:
            raise ValueError(
                "relative position tables must be (offsets, head dim) each with one head "
                f"dimension, got {tuple(rows.shape)} and {tuple(cols.shape)}"
            )
        self.rows = nn.Parameter(rows.detach().clone(), requires_grad=rows.requires_grad)
        self.cols = nn.Parameter(cols.detach().clone(), requires_grad=cols.requires_grad)

    @property
    def head_dim(self) -> int:
        return self.rows.shape[1]

    def scaled(self, factor: float) -> DecomposedRelativePosition:
        """A copy whose bias is `factor` times this one's for the same q (the eventful block
        uses it to take q with the attention scale already folded in)."""
        return DecomposedRelativePosition(self.rows.detach() * factor, self.cols.detach() * factor)

    def forward(self, q: Tensor, grid: tuple[int, int]) -> Tensor:
        """Bias (..., L, L) for queries q (..., L, dh) of a rows x cols grid (L = rows * cols,
        row-major) over the keys of the same grid."""
        rows, cols = grid
        if q.shape[-2] != rows * cols or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"expected queries (..., {rows * cols}, {self.head_dim}) for a {rows}x{cols} "
                f"grid, got {tuple(q.shape)}"
            )
        by_rows = relative_table(rows, rows, self.rows)  # (rows, rows, dh)
        by_cols = relative_table(cols, cols, self.cols)
        lead = q.shape[:-2]
        grid_q = q.reshape(*lead, rows, cols, self.head_dim)
        vertical = torch.einsum("...ijd,ikd->...ijk", grid_q, by_rows)  # (..., rows, cols, rows)
        horizontal = torch.einsum("...ijd,jld->...ijl", grid_q, by_cols)  # (..., r, c, cols)
        bias = vertical[..., :, :, :, None] + horizontal[..., :, :, None, :]
        return bias.reshape(*lead, rows * cols, rows * cols)

    def between(
        self, q: Tensor, grid: tuple[int, int], rows: Tensor | None, cols: Tensor | None
    ) -> Tensor:
        """Bias (G, H, r, c) of each group's query rows `rows` (G, r) over its key columns
        `cols` (G, c) (index tensors into the L = rows * cols positions of the grid; None: all),
        for the groups' queries q (G, H, L, dh).

        Cost: r (R + C) dh multiply-accumulates per head for the rows' table products (R, C:
        the grid's sides) and two adds per (row, column) pair.
        """
        grid_rows, grid_cols = grid
        by_rows = relative_table(grid_rows, grid_rows, self.rows)  # (R, R, dh)
        by_cols = relative_table(grid_cols, grid_cols, self.cols)  # (C, C, dh)
        if rows is None:  # every row: the tables per row are the same for every group
            every = torch.arange(grid_rows * grid_cols, device=q.device)
            vertical = torch.einsum("ghrd,rkd->ghrk", q, by_rows[every // grid_cols])
            horizontal = torch.einsum("ghrd,rkd->ghrk", q, by_cols[every % grid_cols])
        else:
            groups, heads, _, head_dim = q.shape
            by_element = rows[:, None, :, None].expand(groups, heads, -1, head_dim)
            queries = q.gather(2, by_element)
            vertical = torch.einsum("ghrd,grkd->ghrk", queries, by_rows[rows // grid_cols])
            horizontal = torch.einsum("ghrd,grkd->ghrk", queries, by_cols[rows % grid_cols])
        # vertical (G, H, r, R), horizontal (G, H, r, C): each column reads its row and column.
        if cols is None:
            every = torch.arange(grid_rows * grid_cols, device=q.device)
            return vertical[..., every // grid_cols] + horizontal[..., every % grid_cols]
        shape = (*vertical.shape[:3], cols.shape[1])
        key_row = (cols // grid_cols)[:, None, None, :].expand(shape)
        key_col = (cols % grid_cols)[:, None, None, :].expand(shape)
        return vertical.gather(3, key_row) + horizontal.gather(3, key_col)
