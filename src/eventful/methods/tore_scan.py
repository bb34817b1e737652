"""A camera that scans a scene tile by tile and revisits tiles: TORE token recycling with an
eventful aggregator.

The scene's patch grid is cut into equal tiles. Each time step the camera sees one tile; the
extractor (blocks before the split) runs on that view alone, as in `tore.RecycleSession`, and
its output replaces the tile's cached tokens. A prediction runs the aggregator over the latest
tokens of every tile seen, tile after tile in raster order of their places.

Between two predictions only the revisited tile's tokens (and the mean of the tiles' prefix
tokens) change, so once every tile has been seen and the aggregator's input no longer grows,
the aggregator runs as an eventful stream (`policy`, `level`): its gates re-process the tokens
that changed, as they do for the changed patches of a video. While tiles are still arriving
the aggregator runs densely, as TORE does; its first eventful step is dense too. Without a
policy every prediction runs the aggregator densely: TORE alone. The engine takes frames, so
the aggregator's tokens (B, T, D) enter it as a (B, D, 1, T) image of one-pixel patches
(`TokensAsFrames`). The aggregator's stream has no drift control: its input is tokens, not
pixels, and the tiles that were not revisited hold exactly their cached values.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from eventful.core.description import EncoderDescription
from eventful.core.model import EventfulViT
from eventful.core.policies import Policy
from eventful.core.stream import Stream
from eventful.methods.iared2 import block_macs
from eventful.methods.tore import Prediction, Recycler, piece_ids_at


class TokensAsFrames(nn.Module):
    """An embedding for the engine whose input is tokens already: frames (B, D, 1, T), the
    tokens laid in one row of one-pixel patches, -> tokens (B, T, D)."""

    patch_size = 1

    def __init__(self, dim: int, num_prefix_tokens: int) -> None:
        super().__init__()
        self.in_chans = dim
        self.prefix = num_prefix_tokens
        # The engine reads the device and dtype of the embedding's parameters.
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def num_prefix_tokens(self) -> int:
        return self.prefix

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def num_tokens(self, height: int, width: int) -> int:
        return height * width

    def forward(self, frames: Tensor) -> Tensor:
        return frames.flatten(2).transpose(1, 2)


def as_frames(tokens: Tensor) -> Tensor:
    """Tokens (B, T, D) as the (B, D, 1, T) frames `TokensAsFrames` takes."""
    return tokens.transpose(1, 2).unsqueeze(2).contiguous()


class ScanSession:
    """A scene of height x width pixels seen one tile of `tile` (rows, cols) patches at a
    time, by every stream of a batch. `visit(pixels, at)` adds a view of the tile whose
    top-left patch is `at`; `predict()` runs the aggregator over the latest view of every tile
    seen. `ops` holds the multiply-accumulates per stream of the last call, `recompute_ops`
    (after `predict`) what the whole model on the latest views costs (no recycling)."""

    def __init__(
        self,
        model: nn.Module,
        split: int,
        height: int,
        width: int,
        tile: tuple[int, int],
        policy: Policy | None = None,
        level: str = "exact",
        batch_size: int = 1,
    ) -> None:
        self.recycler = Recycler(model, split)
        patch = self.recycler.patch_size
        if height % patch or width % patch:
            raise ValueError(
                f"the scene must be whole patches of {patch} pixels, got {height}x{width}"
            )
        self.grid = (height // patch, width // patch)
        rows, cols = tile
        if rows < 1 or cols < 1 or self.grid[0] % rows or self.grid[1] % cols:
            raise ValueError(
                f"tiles of {rows}x{cols} patches do not cut the {self.grid[0]}x{self.grid[1]} "
                "patch grid evenly"
            )
        self.tile = (rows, cols)
        self.tiles = (self.grid[0] // rows) * (self.grid[1] // cols)
        self.batch_size = batch_size
        self.views: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}
        self.stream: Stream | None = None
        if policy is not None:
            blocks = self.recycler.blocks[split:]
            if not blocks:
                raise ValueError("an eventful aggregator needs a split before the last block")
            prefix = self.recycler.embedding.num_prefix_tokens
            embedding = TokensAsFrames(blocks[0].dim, prefix)
            description = EncoderDescription(embedding, tuple(blocks), self.recycler.norm)
            aggregator = EventfulViT(description, policy, level)
            self.stream = Stream(aggregator, batch_size, drift=None)
        self.ops = 0
        self.recompute_ops = 0

    @torch.no_grad()
    def visit(self, pixels: Tensor, at: tuple[int, int]) -> None:
        """A view (B, C, h, w) of the tile whose top-left patch is `at` (row, column)."""
        rows, cols = self.tile
        patch = self.recycler.patch_size
        expected = (self.batch_size, rows * patch, cols * patch)
        if pixels.dim() != 4 or (pixels.shape[0], *pixels.shape[-2:]) != expected:
            raise ValueError(
                f"expected a tile view ({self.batch_size}, C, {rows * patch}, {cols * patch}), "
                f"got {tuple(pixels.shape)}"
            )
        top, left = at
        if top % rows or left % cols:
            raise ValueError(
                f"a tile's top-left patch sits on a multiple of the {rows}x{cols} tile, "
                f"got {tuple(at)}"
            )
        corners = torch.tensor([[top, left]]).expand(self.batch_size, 2)
        ids = piece_ids_at(corners, rows, cols, self.grid)
        tokens = self.recycler.extract(self.recycler.patch_tokens(pixels), ids, self.grid)
        prefix = self.recycler.embedding.num_prefix_tokens
        self.views[top, left] = (tokens[:, :prefix], tokens[:, prefix:], ids)
        extractor = self.recycler.blocks[: self.recycler.split]
        self.ops = sum(block_macs(block, tokens.shape[1]) for block in extractor)
        self.recompute_ops = 0

    @torch.no_grad()
    def predict(self) -> Prediction:
        """The aggregator over the latest view of every tile seen; eventful (with a policy)
        once every tile has been seen."""
        if not self.views:
            raise ValueError("predict() needs at least one visit() first")
        places = sorted(self.views)
        prefixes = [self.views[place][0] for place in places]
        patches = [self.views[place][1] for place in places]
        ids = [self.views[place][2] for place in places]
        count = self.recycler.embedding.num_prefix_tokens + sum(p.shape[1] for p in patches)
        blocks = self.recycler.blocks
        self.recompute_ops = sum(block_macs(block, count) for block in blocks)
        if self.stream is None or len(places) < self.tiles:
            self.ops = sum(block_macs(block, count) for block in blocks[self.recycler.split :])
            return self.recycler.predict_from(prefixes, patches, ids)
        tokens = torch.cat([torch.stack(prefixes).mean(dim=0), *patches], dim=1)
        output = self.stream(as_frames(tokens))
        self.ops = self.stream.ops.total // self.batch_size
        return Prediction(output, torch.cat(ids, dim=1))
