"""Fidelity of an eventful model to its dense original, frame by frame."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful.core.drift import DEFAULT_DRIFT, DriftControl
from eventful.core.model import EventfulModule
from eventful.models.saliency import SaliencyOutput


@dataclass(frozen=True)
class FrameFidelity:
    """One time step of one stream: cost and distance to the dense model."""

    index: int
    macs: int  # the whole model's, head included
    dense_macs: int
    updated_fraction: float
    feature_cosine: float
    saliency_mae: float | None
    head_macs: int = 0  # the part of macs the head ran
    head_dense_macs: int = 0  # the part of dense_macs the dense head runs

    @property
    def encoder_macs(self) -> int:
        return self.macs - self.head_macs

    @property
    def encoder_dense_macs(self) -> int:
        return self.dense_macs - self.head_dense_macs


def output_tokens(output: Any) -> Tensor:
    """The token features (B, T, D) of a model output: tokens, a feature map (B, D, R, C) as
    tokens in row-major order, a SaliencyOutput, a Hugging Face output (its last hidden state,
    a backbone's last feature map, or a classifier's logits as one token)."""
    if isinstance(output, SaliencyOutput):
        output = output.tokens
    elif hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    elif getattr(output, "feature_maps", None):
        output = output.feature_maps[-1]
    elif getattr(output, "logits", None) is not None:  # a classifier: its logits, one token
        output = output.logits.unsqueeze(1)
    if not isinstance(output, Tensor):
        raise TypeError(f"cannot find token features in a {type(output).__name__}")
    if output.dim() == 4:
        return output.flatten(2).transpose(1, 2)
    return output


def feature_cosine(tokens: Tensor, reference: Tensor, skip_tokens: int = 1) -> Tensor:
    """Per stream, the mean cosine similarity (B,) of the tokens after the first `skip_tokens`."""
    return F.cosine_similarity(tokens[:, skip_tokens:], reference[:, skip_tokens:], dim=-1).mean(1)


def saliency_mae(
    saliency: Tensor, reference: Tensor, area: tuple[int, int, int, int] | None = None
) -> Tensor:
    """Per stream, the mean absolute difference (B,) of two saliency maps (B, 1, H, W), over the
    whole map or over `area` (top, left, height, width): the frame without its letterbox
    padding, whose saliency concerns no pixel of the video."""
    difference = (saliency - reference).abs()
    if area is not None:
        top, left, height, width = area
        difference = difference[..., top : top + height, left : left + width]
    return difference.flatten(1).mean(1)


@torch.no_grad()
def compare_with_dense(
    dense: nn.Module,
    converted: EventfulModule,
    frames: Iterable[Tensor],
    skip_tokens: int = 1,
    drift: DriftControl | None = DEFAULT_DRIFT,
) -> list[FrameFidelity]:
    """Run a fresh single stream of `converted` (with `drift`) and `dense` on each frame
    (1, C, H, W)."""
    stream = converted.stream(batch_size=1, drift=drift)
    results = []
    for index, frame in enumerate(frames):
        output = stream(frame)
        reference = dense(frame)
        cosine = feature_cosine(output_tokens(output), output_tokens(reference), skip_tokens)
        mae = None
        if isinstance(output, SaliencyOutput):
            mae = saliency_mae(output.saliency, reference.saliency).item()
        results.append(
            FrameFidelity(
                index=index,
                macs=stream.ops.total,
                dense_macs=stream.ops.dense,
                updated_fraction=stream.updated_fraction()[0],
                feature_cosine=cosine.item(),
                saliency_mae=mae,
                head_macs=stream.ops.head,
                head_dense_macs=stream.ops.head_dense,
            )
        )
    return results
