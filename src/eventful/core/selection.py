"""Which tokens each stream of a batch re-processes at one gate."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class Selection:
    """Tokens chosen at one gate, for a batch of B streams of N tokens each.

    `per_stream[b]` holds stream b's token indices (s_b,); `flat` holds the same tokens as
    indices into the flattened (B * N) token space, stream by stream, so one matmul serves the
    selected tokens of all streams without padding. `everything` marks a selection of all
    tokens of all streams, which callers run with dense ops instead of index ops.
    """

    per_stream: tuple[Tensor, ...]
    flat: Tensor
    num_tokens: int
    everything: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.per_stream)

    @property
    def counts(self) -> list[int]:
        """Selected tokens per stream; read from shapes, so no device synchronisation."""
        return [index.shape[0] for index in self.per_stream]

    @staticmethod
    def all_tokens(batch_size: int, num_tokens: int, device: torch.device) -> Selection:
        """Every token of every stream; one shared instance per shape and device, since a step
        asks for it at every gate (callers only read its indices)."""
        return _all_tokens(batch_size, num_tokens, torch.device(device))

    @staticmethod
    def from_indices(index: Tensor, num_tokens: int) -> Selection:
        """Equal counts per stream: `index` is (B, K) token indices."""
        batch = index.shape[0]
        if batch == 1:  # the flat indices are the token indices
            return Selection((index[0],), index.reshape(-1), num_tokens)
        offsets = torch.arange(batch, device=index.device).unsqueeze(1) * num_tokens
        flat = (index + offsets).reshape(-1)
        return Selection(tuple(index.unbind(0)), flat, num_tokens)

    @staticmethod
    def from_mask(mask: Tensor) -> Selection:
        """Ragged counts per stream: `mask` is a (B, N) bool tensor of chosen tokens."""
        num_tokens = mask.shape[1]
        flat = mask.reshape(-1).nonzero().squeeze(1)
        counts = mask.sum(dim=1).tolist()
        per_stream = tuple(
            chunk - stream * num_tokens for stream, chunk in enumerate(flat.split(counts))
        )
        return Selection(per_stream, flat, num_tokens)

    @staticmethod
    def from_lists(per_stream: list[Tensor], num_tokens: int) -> Selection:
        flat = torch.cat([index + stream * num_tokens for stream, index in enumerate(per_stream)])
        return Selection(tuple(per_stream), flat, num_tokens)

    def mask(self) -> Tensor:
        """(B, N) bool mask of the tokens this selection holds."""
        mask = torch.zeros(
            self.batch_size * self.num_tokens, dtype=torch.bool, device=self.flat.device
        )
        mask[self.flat] = True
        return mask.view(self.batch_size, self.num_tokens)

    def with_all_tokens_for(self, streams: list[int]) -> Selection:
        """The same selection, except that the given streams select every token."""
        if not streams:
            return self
        device = self.flat.device
        every = torch.arange(self.num_tokens, device=device)
        per_stream = [every if b in streams else index for b, index in enumerate(self.per_stream)]
        if len(streams) == self.batch_size:
            return Selection.all_tokens(self.batch_size, self.num_tokens, device)
        return Selection.from_lists(per_stream, self.num_tokens)


@lru_cache(maxsize=64)
def _all_tokens(batch_size: int, num_tokens: int, device: torch.device) -> Selection:
    every = torch.arange(num_tokens, device=device)
    flat = torch.arange(batch_size * num_tokens, device=device)
    return Selection((every,) * batch_size, flat, num_tokens, everything=True)
