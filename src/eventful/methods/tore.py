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

    def predict_from(self, prefixes: list[Tensor], patches: list[Tensor], ids: list[Tensor]):
        """The aggregator over extracted pieces: per piece its prefix tokens (B, P, D), patch
        tokens (B, n, D) and their ids (B, n); the prefixes enter as their mean."""
        prefix = torch.stack(prefixes).mean(dim=0)
        tokens = torch.cat([prefix, *patches], dim=1)
        return Prediction(self.aggregate(tokens), torch.cat(ids, dim=1))

    def forward(self, frames: Tensor, pieces: list[tuple[int, int, int, int]]) -> Prediction:
        """What a session predicts after adding `pieces` of full frames (B, C, H, W) in order,
        each (top, left, rows, cols) in patches, the same for every stream; with gradients
        when they are enabled (fine-tuning, `tore_train`). Pieces of one size are extracted
        together."""
        patch = self.patch_size
        if frames.dim() != 4 or frames.shape[-2] % patch or frames.shape[-1] % patch:
            raise ValueError(
                f"expected full frames (B, C, H, W) of whole patches of {patch} pixels, got "
                f"{tuple(frames.shape)}"
            )
        if not pieces:
            raise ValueError("a prediction needs at least one piece")
        grid = (frames.shape[-2] // patch, frames.shape[-1] // patch)
        batch = frames.shape[0]
        seen = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
        piece_ids = []
        for top, left, rows, cols in pieces:
            ids = piece_ids_at(torch.tensor([[top, left]]), rows, cols, grid)[0]
            if bool(seen[ids].any()):
                raise ValueError(f"the piece {(top, left, rows, cols)} overlaps an earlier one")
            seen[ids] = True
            piece_ids.append(ids)
        tokens = self.patch_tokens(frames)
        extracted: list[Tensor | None] = [None] * len(pieces)
        for size in dict.fromkeys(ids.numel() for ids in piece_ids):
            members = [index for index, ids in enumerate(piece_ids) if ids.numel() == size]
            ids = torch.stack([piece_ids[index] for index in members]).repeat_interleave(batch, 0)
            patches = tokens.repeat(len(members), 1, 1).gather(
                1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
            )
            out = self.extract(patches, ids, grid).split(batch)
            for index, piece in zip(members, out, strict=True):
                extracted[index] = piece
        prefix = self.embedding.num_prefix_tokens
        return self.predict_from(
            [piece[:, :prefix] for piece in extracted],
            [piece[:, prefix:] for piece in extracted],
            [ids.expand(batch, -1) for ids in piece_ids],
        )


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
        tokens = self.prefix + sum(patches.shape[1] for patches in self.patches)
        blocks = self.recycler.blocks
        self.ops = sum(block_macs(block, tokens) for block in blocks[self.recycler.split :])
        self.recompute_ops = sum(block_macs(block, tokens) for block in blocks)
        return self.recycler.predict_from(self.prefixes, self.patches, self.ids)

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
        corner = torch.as_tensor(at, dtype=torch.long).reshape(-1, 2).expand(self.batch_size, 2)
        ids = piece_ids_at(corner, height // patch, width // patch, self.grid)
        self._check_new(ids)
        return ids

    def _check_new(self, ids: Tensor) -> None:
        overlap = self.seen.gather(1, ids).any(dim=1)
        if bool(overlap.any()):
            streams = overlap.nonzero().squeeze(1).tolist()
            raise ValueError(f"streams {streams}: the piece overlaps patches already added")


def piece_ids_at(corners: Tensor, rows: int, cols: int, grid: tuple[int, int]) -> Tensor:
    """The full grid's patch ids (B, rows * cols), row-major, of a piece of rows x cols patches
    whose top-left patch sits at corners (B, 2) of each stream; refuses one that leaves the
    grid."""
    grid_rows, grid_cols = grid
    if rows < 1 or cols < 1:
        raise ValueError(f"a piece needs at least one patch each way, got {rows}x{cols} patches")
    for stream, (top, left) in enumerate(corners.tolist()):
        if top < 0 or left < 0 or top + rows > grid_rows or left + cols > grid_cols:
            raise ValueError(
                f"stream {stream}: a piece of {rows}x{cols} patches at ({top}, {left}) "
                f"leaves the {grid_rows}x{grid_cols} grid"
            )
    row = corners[:, :1, None] + torch.arange(rows)[None, :, None]
    col = corners[:, 1:, None] + torch.arange(cols)[None, None, :]
    return (row * grid_cols + col).reshape(corners.shape[0], -1)
