"""TORE token recycling (Olszewski et al., 2023) for inputs that arrive piece by piece.

The blocks are split at block K: the extractor (blocks 0..K-1) runs once on each new piece
of the image, alone, and its output tokens are cached; the aggregator (blocks K..depth-1)
runs over every cached token whenever a prediction is wanted. Each piece gets its own prefix
tokens (class token, registers) in the extractor; the aggregator receives their mean, as the
paper does. A piece's patches take the position embedding of their place in the full image's
grid. With K = 0 the extractor does nothing and a prediction is the full model on the union
of the pieces; the saving grows with K.

Models without a class token work the same way: their prefix is only registers, or nothing.
Windowed or biased attention is refused: a piece would cut its windows and positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eventful.convert import adapt_encoder, find_encoder, is_encoder
from eventful.methods.iared2 import block_macs, dense_block


@dataclass
class Prediction:
    """tokens (B, P + n, D): final-norm output, the prefix (the mean of the pieces' prefix
    tokens, through the aggregator) then every patch seen so far, in the order of `ids`
    (B, n), their places in the full grid (row-major)."""

    tokens: Tensor
    ids: Tensor


class Recycler(nn.Module):
    """`model` (a supported encoder, or a model that calls one) split at block `split` for
    token recycling; `session(height, width)` starts an input of that size."""

    def __init__(self, model: nn.Module, split: int) -> None:
        super().__init__()
        encoder = model if is_encoder(model) else find_encoder(model)[1]
        description = adapt_encoder(encoder).description
        partitioned = description.partitioned_blocks
        if partitioned:
            raise ValueError(
                "token recycling runs pieces alone through global attention; block "
                f"{partitioned[0]} attends within windows or with a relative position bias"
            )
        depth = len(description.blocks)
        if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split <= depth:
            raise ValueError(f"split must be an integer in [0, {depth}], got {split!r}")
        self.embedding = description.embedding
        self.blocks = description.blocks
        self.norm = description.norm
        self.split = split

    @property
    def patch_size(self) -> int:
        return self.embedding.patch_size

    def session(self, height: int, width: int, batch_size: int = 1) -> RecycleSession:
        return RecycleSession(self, height, width, batch_size)

    def patch_tokens(self, pixels: Tensor) -> Tensor:
        """The patch projection of pixels (B, C, h, w), whole patches: (B, n, D), row-major."""
        return self.embedding.patch_projection(pixels).flatten(2).transpose(1, 2)

    def extract(self, patches: Tensor, ids: Tensor, grid: tuple[int, int]) -> Tensor:
        """The extractor on patch tokens (B, n, D) (`patch_tokens`) at `ids` (B, n) of the
        full grid: prefix and patch tokens (B, P + n, D) after block K."""
        embedding = self.embedding
        position = embedding.position_for_grid(*grid)
        classes = embedding.num_prefix_tokens - embedding.registers.shape[1]
        patch_position = position[0, classes:][ids]
        batch = patches.shape[0]
        prefix = [embedding.registers.expand(batch, -1, -1)]
        if classes:
            prefix.insert(0, (embedding.class_token + position[:, :classes]).expand(batch, -1, -1))
        tokens = torch.cat([*prefix, patches + patch_position], dim=1)
        for block in self.blocks[: self.split]:
            tokens = dense_block(block, tokens)
        return tokens

    def aggregate(self, tokens: Tensor) -> Tensor:
        """The aggregator (blocks K..depth-1) and the final norm on tokens (B, T, D)."""
        for block in self.blocks[self.split :]:
            tokens = dense_block(block, tokens)
        return self.norm(tokens)


class RecycleSession:
    """One image per stream of a batch, arriving piece by piece: `add` a piece, `predict`
    from everything added so far. `ops` holds the multiply-accumulates per stream of the last
    call, `recompute_ops` what re-running the whole model on every piece seen so far costs."""

    def __init__(self, recycler: Recycler, height: int, width: int, batch_size: int) -> None:
        patch = recycler.patch_size
        if height % patch or width % patch or height < patch or width < patch:
            raise ValueError(
                f"the full image must be whole patches of {patch} pixels, got {height}x{width}"
            )
        self.recycler = recycler
        self.grid = (height // patch, width // patch)
        self.batch_size = batch_size
        self.seen = torch.zeros(batch_size, self.grid[0] * self.grid[1], dtype=torch.bool)
        self.prefixes: list[Tensor] = []  # per piece (B, P, D)
        self.patches: list[Tensor] = []  # per piece (B, n, D)
        self.ids: list[Tensor] = []  # per piece (B, n)
        self.ops = 0
        self.recompute_ops = 0

    @property
    def prefix(self) -> int:
        return self.recycler.embedding.num_prefix_tokens

    @torch.no_grad()
    def add(self, pieces: Tensor, at: tuple[int, int] | Tensor) -> None:
        """Add one piece per stream: pixels (B, C, h, w), whole patches, whose top-left patch
        sits at `at` (row, column in patches; one pair for every stream, or (B, 2))."""
        ids = self._ids(pieces, at)
        self._extract(self.recycler.patch_tokens(pieces), ids)

    @torch.no_grad()
    def add_patches(self, frames: Tensor, mask: Tensor) -> None:
        """Add the patches that `mask` (B, rows, cols) marks in full frames (B, C, H, W): a
        newly revealed region of any shape. Every stream adds as many patches."""
        rows, cols = self.grid
        patch = self.recycler.patch_size
        expected = (self.batch_size, rows * patch, cols * patch)
        if frames.dim() != 4 or (frames.shape[0], *frames.shape[-2:]) != expected:
            raise ValueError(
                f"expected full frames ({self.batch_size}, C, {rows * patch}, {cols * patch}), "
                f"got {tuple(frames.shape)}"
            )
        if mask.dtype != torch.bool or tuple(mask.shape) != (self.batch_size, rows, cols):
            raise ValueError(
                f"expected a bool patch mask ({self.batch_size}, {rows}, {cols}), got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        counts = mask.flatten(1).sum(dim=1).tolist()
        if len(set(counts)) != 1 or counts[0] == 0:
            raise ValueError(f"every stream must add the same number of patches, got {counts}")
        ids = mask.flatten(1).nonzero()[:, 1].view(self.batch_size, counts[0])
        self._check_new(ids)
        patches = self.recycler.patch_tokens(frames)
        self._extract(patches.gather(1, ids.unsqueeze(-1).expand(-1, -1, patches.shape[-1])), ids)

    def _extract(self, patches: Tensor, ids: Tensor) -> None:
        tokens = self.recycler.extract(patches, ids, self.grid)
        self.prefixes.append(tokens[:, : self.prefix])
        self.patches.append(tokens[:, self.prefix :])
        self.ids.append(ids)
        self.seen.scatter_(1, ids, True)
        blocks = self.recycler.blocks[: self.recycler.split]
        self.ops = sum(block_macs(block, tokens.shape[1]) for block in blocks)
        self.recompute_ops = 0

    @torch.no_grad()
    def predict(self) -> Prediction:
        """The aggregator over every piece added so far."""
        if not self.patches:
            raise ValueError("predict() needs at least one add() first")
        prefix = torch.stack(self.prefixes).mean(dim=0)
        tokens = torch.cat([prefix, *self.patches], dim=1)
        blocks = self.recycler.blocks
        self.ops = sum(
            block_macs(block, tokens.shape[1]) for block in blocks[self.recycler.split :]
        )
        self.recompute_ops = sum(block_macs(block, tokens.shape[1]) for block in blocks)
        return Prediction(self.recycler.aggregate(tokens), torch.cat(self.ids, dim=1))

    def _ids(self, pieces: Tensor, at: tuple[int, int] | Tensor) -> Tensor:
        """The full grid's patch ids (B, n) a piece covers, after checking it fits."""
        patch = self.recycler.patch_size
        if pieces.dim() != 4 or pieces.shape[0] != self.batch_size:
            raise ValueError(
                f"expected pieces (B, C, h, w) with B = {self.batch_size}, got "
                f"{tuple(pieces.shape)}"
            )
        height, width = pieces.shape[-2:]
        if height % patch or width % patch or height == 0 or width == 0:
            raise ValueError(
                f"a piece must be whole patches of {patch} pixels, got {height}x{width}"
            )
        rows, cols = height // patch, width // patch
        corner = torch.as_tensor(at, dtype=torch.long).reshape(-1, 2).expand(self.batch_size, 2)
        grid_rows, grid_cols = self.grid
        for stream, (top, left) in enumerate(corner.tolist()):
            if top < 0 or left < 0 or top + rows > grid_rows or left + cols > grid_cols:
                raise ValueError(
                    f"stream {stream}: a piece of {rows}x{cols} patches at ({top}, {left}) "
                    f"leaves the {grid_rows}x{grid_cols} grid"
                )
        row = corner[:, :1, None] + torch.arange(rows)[None, :, None]
        col = corner[:, 1:, None] + torch.arange(cols)[None, None, :]
        ids = (row * grid_cols + col).reshape(self.batch_size, -1)
        self._check_new(ids)
        return ids

    def _check_new(self, ids: Tensor) -> None:
        overlap = self.seen.gather(1, ids).any(dim=1)
        if bool(overlap.any()):
            streams = overlap.nonzero().squeeze(1).tolist()
            raise ValueError(f"streams {streams}: the piece overlaps patches already added")
