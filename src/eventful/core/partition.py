"""Attention partitions: which tokens attend to which.

Global attention: every token attends to every token. Windows (ViTDet): the patch grid is
padded at the bottom and right to whole windows of `size` x `size` patches, and each token
attends only within its window. Padded positions hold zeros before the qkv projection, so their
keys and values are the projection's bias: the same on every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Windows:
    """Non-overlapping windows of `size` x `size` patches over a zero-padded grid."""

    size: int

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"window size must be a positive integer, got {self.size!r}")

    def padded_grid(self, rows: int, cols: int) -> tuple[int, int]:
        """The grid (rows, cols) rounded up to whole windows."""
        size = self.size
        return -(-rows // size) * size, -(-cols // size) * size

    def count(self, rows: int, cols: int) -> int:
        """Windows per image of a rows x cols patch grid."""
        padded_rows, padded_cols = self.padded_grid(rows, cols)
        return (padded_rows // self.size) * (padded_cols // self.size)


def to_windows(grid: Tensor, size: int) -> Tensor:
    """(B, R, C, X) with R, C whole windows -> (B * windows, size * size, X), row-major windows."""
    batch, rows, cols, channels = grid.shape
    windows = grid.view(batch, rows // size, size, cols // size, size, channels)
    return windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, size * size, channels)


def from_windows(windows: Tensor, batch: int, rows: int, cols: int, size: int) -> Tensor:
    """Inverse of `to_windows`: (B * windows, size * size, X) -> (B, R, C, X)."""
    channels = windows.shape[-1]
    grid = windows.view(batch, rows // size, cols // size, size, size, channels)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, rows, cols, channels)


@dataclass(frozen=True)
class GroupLayout:
    """How the tokens of one stream map onto its attention groups.

    groups: attention groups per stream (1 for global attention, the windows for windows);
    length: slots per group (L; a window's slots include its padding); sides: the grid
    (rows, cols) of one group, which a bias needs; slot (N,): each token's slot, group * L +
    position in the group; padded (groups, L): the positions that hold no token (a window's
    padding; none under global attention).
    """

    groups: int
    length: int
    sides: tuple[int, int]
    slot: Tensor
    padded: Tensor


def group_layout(
    window: Windows | None, grid: tuple[int, int], device: torch.device
) -> GroupLayout:
    """The layout of a rows x cols patch grid (no prefix tokens) under global attention
    (window None) or windows, in the order of `to_windows`."""
    rows, cols = grid
    if window is None:
        return GroupLayout(1, rows * cols, grid, *_every_slot_used(rows * cols, device))
    size = window.size
    _, padded_cols = window.padded_grid(rows, cols)
    row = torch.arange(rows, device=device).unsqueeze(1)
    col = torch.arange(cols, device=device).unsqueeze(0)
    window_index = (row // size) * (padded_cols // size) + col // size
    position = (row % size) * size + col % size
    slot = (window_index * size * size + position).reshape(-1)
    groups, length = window.count(rows, cols), size * size
    used = torch.zeros(groups * length, dtype=torch.bool, device=device)
    used[slot] = True
    return GroupLayout(groups, length, (size, size), slot, ~used.view(groups, length))


def whole_sequence_layout(num_tokens: int, device: torch.device) -> GroupLayout:
    """All tokens of a stream, prefix tokens included, as one group in order (global attention
    without a bias, which needs no grid)."""
    return GroupLayout(1, num_tokens, (1, num_tokens), *_every_slot_used(num_tokens, device))


def _every_slot_used(length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    slot = torch.arange(length, device=device)
    return slot, torch.zeros(1, length, dtype=torch.bool, device=device)
