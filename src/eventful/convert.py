"""`eventful.convert`: the one call that turns a model into its eventful copy."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from eventful.core.local_head import convert_heads
from eventful.core.model import EventfulModule, EventfulViT
from eventful.core.policies import Policy
from eventful.core.wrapper import EncoderCall, EventfulWrapper
from eventful.models import hf, hf_vitdet
from eventful.models.vit import ViT, describe_vit
from eventful.models.vitdet import FeatureMap, ViTDet, describe_vitdet

SUPPORTED = (
    "eventful.ViT, eventful.ViTDet; transformers ViTModel, Dinov2Model, "
    "Dinov2WithRegistersModel, VitDetModel, VitDetBackbone; and any model that calls exactly "
    "one of these as its encoder (ViTForImageClassification, Dinov2ForImageClassification, a "
    "backbone with your own head, ...)"
)


def convert(
    model: nn.Module,
    policy: Policy,
    level: str | Sequence[str] = "exact",
    cache_dtype: torch.dtype | None = None,
) -> EventfulModule:
    """A new eventful module computing what `model` computes; `model` is left unchanged.

    The converted model is called as `model(frames, state)` or through `model.stream()` and
    returns what `model` returns: tokens (B, T, D) for `eventful.ViT`, the transformers output
    object for transformers models, the wrapper's own output for models with a head.
    level: "tokenwise", "qk", "full" or "exact" (the default: exact attention, no N x N cache;
    see BENCHMARKS.md) for every block, or a sequence with one per block.
    cache_dtype: e.g. torch.float16 to halve the N x N attention caches of "qk" and "full".
    """
    if isinstance(model, ViT):
        return EventfulViT(describe_vit(model), policy, level, cache_dtype)
    if isinstance(model, ViTDet):
        eventful_vitdet = EventfulViT(describe_vitdet(model), policy, level, cache_dtype)
        feature_map = FeatureMap(model.embedding.patch_size)
        return EventfulWrapper(EncoderCall(eventful_vitdet, feature_map, _no_options), "")
    if _is_encoder(model):
        return EventfulWrapper(_encoder_call(model, policy, level, cache_dtype), "")
    path, encoder = _find_encoder(model)
    call = _encoder_call(encoder, policy, level, cache_dtype)
    # The copy takes the call where the encoder was, without copying the encoder's weights.
    wrapped = copy.deepcopy(model, memo={id(encoder): call})
    _, dense_layers = convert_heads(wrapped, path)
    if dense_layers:
        warnings.warn(
            f"eventful.convert: the head layers {', '.join(dense_layers)} of "
            f"{type(model).__name__} are not local convolutions; they run densely on every step",
            stacklevel=2,
        )
    return EventfulWrapper(wrapped, path, dense_layers)


def _is_encoder(module: nn.Module) -> bool:
    return isinstance(module, ViT) or hf.is_hf_encoder(module) or hf_vitdet.is_hf_vitdet(module)


def _encoder_call(
    encoder: nn.Module,
    policy: Policy,
    level: str | Sequence[str],
    cache_dtype: torch.dtype | None,
) -> EncoderCall:
    if isinstance(encoder, ViT):
        eventful_vit = EventfulViT(describe_vit(encoder), policy, level, cache_dtype)
        return EncoderCall(eventful_vit, _tokens, _no_options)
    if hf_vitdet.is_hf_vitdet(encoder):
        description = hf_vitdet.describe_hf_vitdet(encoder)
        taps = hf_vitdet.tapped_stages(encoder)
        eventful_vitdet = EventfulViT(description, policy, level, cache_dtype, taps)
        output = hf_vitdet.VitDetOutput(encoder)
        return EncoderCall(eventful_vitdet, output, hf_vitdet.check_vitdet_options)
    eventful_vit = EventfulViT(describe_vit(hf.vit_from_hf(encoder)), policy, level, cache_dtype)
    return EncoderCall(eventful_vit, hf.HFEncoderOutput(encoder), hf.check_hf_encoder_options)


def _tokens(tokens: Tensor, pixel_values: Tensor) -> Tensor:
    return tokens


def _no_options(options: dict) -> None:
    if options:
        raise TypeError(f"an eventful.ViT encoder takes frames only, got options {options}")


def _find_encoder(model: nn.Module) -> tuple[str, nn.Module]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside_found = any(name.startswith(prefix + ".") for prefix, _ in found)
        if not inside_found and _is_encoder(module):
            found.append((name, module))
    if not found:
        raise TypeError(f"cannot convert a {type(model).__name__}; supported models: {SUPPORTED}")
    if len(found) > 1:
        names = ", ".join(repr(name) for name, _ in found)
        raise TypeError(
            f"cannot convert a {type(model).__name__}: it holds {len(found)} encoders ({names}); "
            "expected exactly one"
        )
    return found[0]
