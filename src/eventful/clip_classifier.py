"""Video classification with a factorised ViViT on the eventful engine.

`EventfulViViT` classifies clips: the spatial model is an eventful stream across the time steps
of each clip (every clip, every view, starts afresh: its first step is dense), and the
temporal transformer and the classifier run on the steps' class tokens. Several views of a
clip run as streams of one batch (`views`). `SlidingWindowClassifier` classifies a live
stream over its last time steps: each new time step runs the spatial model once, eventful
across the whole stream, instead of recomputing the window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor

from eventful.core.drift import DEFAULT_DRIFT, DriftControl
from eventful.core.model import EventfulViT
from eventful.core.ops import dense_block_macs
from eventful.core.policies import Policy
from eventful.core.stream import Stream
from eventful.models.vit import describe_block, describe_vit
from eventful.models.vivit import ViViT


def temporal_macs(vivit: ViViT, steps: int) -> int:
    """Multiply-accumulates of the temporal transformer's blocks on `steps` class tokens and its
    own class token, and of the classifier."""
    blocks = vivit.temporal.blocks
    macs = sum(sum(dense_block_macs(describe_block(b), steps + 1).values()) for b in blocks)
    return macs + vivit.head.in_features * vivit.head.out_features


class EventfulViViT:
    """`vivit` whose spatial model is eventful (`policy`, `level`, `cache_dtype`, `precision` as
    in `eventful.convert`) across the time steps of each clip. After each call, `ops` holds the
    multiply-accumulates per clip (spatial blocks, temporal blocks and classifier) and
    `dense_ops` those of the dense model."""

    def __init__(
        self,
        vivit: ViViT,
        policy: Policy,
        level: str | Sequence[str] = "exact",
        cache_dtype: torch.dtype | None = None,
        precision: str = "fp32",
    ) -> None:
        self.vivit = vivit.eval()
        self.spatial = EventfulViT(
            describe_vit(vivit.spatial), policy, level, cache_dtype, precision=precision
        )
        self.ops: list[int] = []
        self.dense_ops: list[int] = []

    @property
    def precision(self) -> str:
        return self.spatial.precision

    @torch.no_grad()
    def __call__(self, clips: Tensor) -> Tensor:
        """Clips (B, T, C, H, W) -> logits (B, classes); each clip is a fresh stream."""
        steps = self.vivit.steps(clips)
        batch, count = steps.shape[:2]
        stream = Stream(self.spatial, batch, drift=None)
        tokens, ops, dense = [], [0] * batch, [0] * batch
        for step in range(count):
            tokens.append(stream(steps[:, step])[:, 0])
            for index in range(batch):
                ops[index] += sum(stream.ops.per_stream[index].values())
                dense[index] += stream.ops.dense_per_stream[index]
        temporal = temporal_macs(self.vivit, count)
        self.ops = [spent + temporal for spent in ops]
        self.dense_ops = [spent + temporal for spent in dense]
        return self.vivit.classify(torch.stack(tokens, dim=1))

    def views(self, views: Tensor | Sequence[Tensor]) -> Tensor:
        """Views of each clip, (B, V, T, C, H, W) or one (V, T, C, H, W) per clip, all run as
        streams of one batch -> per clip the mean of its views' logits (B, classes). `ops`
        then holds the ops per view."""
        if not isinstance(views, Tensor):
            counts = [len(clip_views) for clip_views in views]
            if len(set(counts)) != 1:
                raise ValueError(f"every clip needs as many views; got view counts {counts}")
            views = torch.stack(list(views))
        if views.dim() != 6:
            raise ValueError(f"expected views (B, V, T, C, H, W), got {tuple(views.shape)}")
        batch, count = views.shape[:2]
        logits = self(views.flatten(0, 1))
        return logits.view(batch, count, -1).mean(dim=1)


def clip_views(clip: Tensor, length: int, size: int, temporal: int = 1, spatial: int = 1) -> Tensor:
    """Views of clips (B, T, C, H, W) -> (B, temporal * spatial, length, C, size, size),
    temporal-major: `temporal` windows of `length` frames at evenly spaced starts from the
    clip's start to its end (one window: the middle; a clip shorter than `length` is padded by
    repeating its last frame), times `spatial` square crops of `size` pixels at evenly spaced
    places along the longer side from one end to the other (one crop: the centre), centred on
    the other side."""
    if clip.dim() != 5:
        raise ValueError(f"expected clips (B, T, C, H, W), got {tuple(clip.shape)}")
    for name, value in (("length", length), ("size", size), ("temporal", temporal)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(spatial, bool) or not isinstance(spatial, int) or spatial < 1:
        raise ValueError(f"spatial must be a positive integer, got {spatial!r}")
    frames, height, width = clip.shape[1], clip.shape[-2], clip.shape[-1]
    if size > min(height, width):
        raise ValueError(f"crops of {size} pixels do not fit frames of {height}x{width}")
    if frames < length:
        clip = torch.cat([clip, clip[:, -1:].expand(-1, length - frames, -1, -1, -1)], dim=1)
        frames = length
    starts = torch.linspace(0, frames - length, temporal).round().long().tolist()
    if temporal == 1:
        starts = [(frames - length) // 2]  # one window: the middle of the clip
    along = max(height, width) - size
    offsets = torch.linspace(0, along, spatial).round().long().tolist()
    if spatial == 1:
        offsets = [along // 2]  # one crop: the centre
    across = (min(height, width) - size) // 2
    views = []
    for start in starts:
        window = clip[:, start : start + length]
        for offset in offsets:
            top, left = (offset, across) if height >= width else (across, offset)
            views.append(window[..., top : top + size, left : left + size])
    return torch.stack(views, dim=1)


class SlidingWindowClassifier:
    """A live stream (B streams) classified over its last `window` time steps. Frames arrive
    one at a time; each completed time step (a tubelet of frames) runs the spatial model once,
    as one step of an eventful stream over the whole video (with drift control, `drift`), and
    its class token joins the window. `ops` holds, per stream, the multiply-accumulates of the
    last completed step (spatial step, temporal blocks, classifier), `recompute_ops` those of
    running the dense model on the whole window instead."""

    def __init__(
        self,
        vivit: ViViT,
        policy: Policy,
        window: int,
        level: str | Sequence[str] = "exact",
        batch_size: int = 1,
        drift: DriftControl | None = DEFAULT_DRIFT,
    ) -> None:
        limit = vivit.temporal.max_steps
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= limit:
            raise ValueError(f"window must be 1 to {limit} time steps, got {window!r}")
        self.vivit = vivit.eval()
        self.window = window
        spatial = EventfulViT(describe_vit(vivit.spatial), policy, level)
        self.stream = Stream(spatial, batch_size, drift=drift)
        self.pending: list[Tensor] = []
        self.tokens: deque[Tensor] = deque(maxlen=window)
        self.ops: list[int] = []
        self.recompute_ops: list[int] = []

    @torch.no_grad()
    def __call__(self, frames: Tensor) -> Tensor | None:
        """One frame per stream (B, C, H, W) -> logits (B, classes) over the window when the
        frame completes a time step, else None."""
        vivit = self.vivit
        expected = (self.stream.batch_size, vivit.channels)
        if frames.dim() != 4 or tuple(frames.shape[:2]) != expected:
            raise ValueError(
                f"expected frames ({expected[0]}, {expected[1]}, H, W), got {tuple(frames.shape)}"
            )
        if self.pending and frames.shape != self.pending[0].shape:
            raise ValueError(
                f"frames of shape {tuple(frames.shape)} differ from the tubelet's first "
                f"{tuple(self.pending[0].shape)}"
            )
        if not bool(torch.isfinite(frames).all()):
            raise ValueError("frames contain NaN or Inf values; expected finite pixel values")
        if len(self.pending) + 1 < vivit.tubelet:
            self.pending.append(frames)
            return None
        token = self.stream(torch.cat([*self.pending, frames], dim=1))[:, 0]
        self.pending = []
        self.tokens.append(token)
        count = len(self.tokens)
        temporal = temporal_macs(vivit, count)
        ops = self.stream.ops
        self.ops = [sum(spent.values()) + temporal for spent in ops.per_stream]
        dense_step = ops.dense_per_stream[0]
        self.recompute_ops = [count * dense_step + temporal] * self.stream.batch_size
        return vivit.classify(torch.stack(list(self.tokens), dim=1))

    def reset(self) -> None:
        """Forget the window, the pending frames and the stream's caches."""
        self.pending = []
        self.tokens.clear()
        self.stream.reset()
