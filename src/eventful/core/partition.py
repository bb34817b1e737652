"""Attention partitions: which tokens attend to which.

Global attention: every token attends to every token. Windows (ViTDet): the patch grid is
padded at the bottom and right to whole windows of `size` x `size` patches, and each token
attends only within its window. Padded positions hold zeros before the qkv projection, so their
keys and values are the projection's bias: the same on every step.
"""

from __future__ import annotations

from dataclasses import dataclass

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
