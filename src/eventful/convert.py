"""`eventful.convert`: the one call that turns a model into its eventful copy."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from eventful.core.description import EncoderDescription
from eventful.core.local_head import convert_heads
from eventful.core.model import EventfulModule, EventfulViT
from eventful.core.policies import Policy
from eventful.core.precision import resolve_precision
from eventful.core.wrapper import EncoderCall, EventfulWrapper
from eventful.models import hf, hf_vitdet
from eventful.models.vit import ViT, describe_vit
from eventful.models.vitdet import FeatureMap, ViTDet, describe_vitdet
from eventful.models.vivit import ViViT

SUPPORTED = (
    "eventful.ViT, eventful.ViTDet, a factorised eventful.models.vivit.ViViT; transformers "
    "ViTModel, Dinov2Model, Dinov2WithRegistersModel, VitDetModel, VitDetBackbone; and any "
    "model that calls exactly "
    "one of these as its encoder (ViTForImageClassification, Dinov2ForImageClassification, a "
    "backbone with your own head, ...)"
)


# Hugging Face video transformers whose blocks mix time steps: (class names, why).
JOINT_VIDEO_MODELS = (
    (
        ("VivitModel", "VivitForVideoClassification", "VideoMAEModel",
         "VideoMAEForVideoClassification"),
        "attends jointly over the tubelets of every time step of a clip in every block",
    ),
    (
        ("TimesformerModel", "TimesformerForVideoClassification"),
        "attends across time steps (divided space-time attention) in every block",
    ),
)  # fmt: skip


def convert(
    model: nn.Module,
    policy: Policy,
    level: str | Sequence[str] = "exact",
    cache_dtype: torch.dtype | None = None,
    precision: str = "fp32",
) -> EventfulModule:
    """A new eventful module computing what `model` computes; `model` is left unchanged.

    The converted model is called as `model(frames, state)` or through `model.stream()` and
    returns what `model` returns: tokens (B, T, D) for `eventful.ViT`, the transformers output
    object for transformers models, the wrapper's own output for models with a head.
    level: "tokenwise", "qk", "full" or "exact" (the default: exact attention, no N x N cache;
    see BENCHMARKS.md) for every block, or a sequence with one per block.
    cache_dtype: e.g. torch.float16 to halve the N x N attention caches of "qk" and "full".
    precision: the arithmetic of the encoder's linear layers, "fp32" (the default), "bf16",
    "int8" or "auto" (`eventful.core.precision`: "bf16" where the model's device multiplies
    bfloat16 natively, else "fp32"); the converted model's `precision` says what was chosen.
    "bf16" is refused where it would run emulated. Caches stay float32 at every precision (but
    the tokenwise level's qkv buffer at "bf16", which attention reads only rounded to bfloat16).
    A factorised `ViViT` gives an `EventfulViViT`, called on clips, whose spatial model is
    eventful across the time steps of each clip.
    The copy's weights are ordinary tensors in every grad mode, also when converted under
    `torch.inference_mode` (whose tensors could not be loaded into or trained outside it).
    """
    chosen = resolve_precision(precision, _device_of(model))
    with torch.inference_mode(False):
        return _convert(model, policy, level, cache_dtype, chosen)


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def _convert(
    model: nn.Module,
    policy: Policy,
    level: str | Sequence[str],
    cache_dtype: torch.dtype | None,
    precision: str,
) -> EventfulModule:
    if isinstance(model, ViT):
        return EventfulViT(describe_vit(model), policy, level, cache_dtype, precision=precision)
    if isinstance(model, ViViT):
        from eventful.clip_classifier import EventfulViViT

        return EventfulViViT(model, policy, level, cache_dtype, precision)
    refuse_joint_video(model)
    if is_encoder(model):
        return EventfulWrapper(_encoder_call(model, policy, level, cache_dtype, precision), "")
    wrapped, path = replace_encoder(
        model, lambda encoder: _encoder_call(encoder, policy, level, cache_dtype, precision)
    )
    # At precision bf16 the head's convolutions multiply in bfloat16 too, as they do in the
    # dense model cast to bfloat16; its caches, and the sums the sparse updates add, stay float32.
    head_dtype = torch.bfloat16 if precision == "bf16" else None
    _, dense_layers = convert_heads(wrapped, path, head_dtype)
    if dense_layers:
        warnings.warn(
            f"eventful.convert: the head layers {', '.join(dense_layers)} of "
            f"{type(model).__name__} are not local convolutions; they run densely on every step",
            stacklevel=2,
        )
    return EventfulWrapper(wrapped, path, dense_layers)


def refuse_joint_video(model: nn.Module) -> None:
    """Refuse, naming why, a video transformer whose blocks mix the tokens of time steps: the
    engine makes a model eventful across frames, so it needs a model per time step."""
    name = type(model).__name__
    for names, why in JOINT_VIDEO_MODELS:
        if name in names:
            raise TypeError(
                f"{name} {why}, so no token belongs to one frame and there is no per-frame "
                "model to make eventful across frames; a factorised video model runs a "
                "spatial model per time step: eventful.models.vivit.ViViT"
            )


def is_encoder(module: nn.Module) -> bool:
    return (
        isinstance(module, (ViT, ViTDet))
        or hf.is_hf_encoder(module)
        or hf_vitdet.is_hf_vitdet(module)
    )


@dataclass(frozen=True)
class EncoderAdapter:
    """What the engine needs of a supported encoder: its description, how to turn final-norm
    tokens (B, T, D) into what the encoder returns, how to check its keyword options, and the
    blocks whose outputs it also returns (taps)."""

    description: EncoderDescription
    format_output: Callable[[Tensor, Tensor], Any]
    check_arguments: Callable[[dict], None]
    taps: tuple[int, ...] = ()


def adapt_encoder(encoder: nn.Module) -> EncoderAdapter:
    """The adapter of a supported encoder (`is_encoder`)."""
    if isinstance(encoder, ViT):
        return EncoderAdapter(describe_vit(encoder), _tokens, _no_options)
    if isinstance(encoder, ViTDet):
        feature_map = FeatureMap(encoder.embedding.patch_size)
        return EncoderAdapter(describe_vitdet(encoder), feature_map, _no_options)
    if hf_vitdet.is_hf_vitdet(encoder):
        return EncoderAdapter(
            hf_vitdet.describe_hf_vitdet(encoder),
            hf_vitdet.VitDetOutput(encoder),
            hf_vitdet.check_vitdet_options,
            hf_vitdet.tapped_stages(encoder),
        )
    description = describe_vit(hf.vit_from_hf(encoder))
    return EncoderAdapter(description, hf.HFEncoderOutput(encoder), hf.check_hf_encoder_options)


def replace_encoder(model: nn.Module, make_call: Callable[[nn.Module], nn.Module]):
    """A copy of `model` whose one encoder is replaced by `make_call(encoder)`, without copying
    the encoder's weights; returns the copy and the encoder's path in it."""
    path, encoder = find_encoder(model)
    call = make_call(encoder)
    return copy.deepcopy(model, memo={id(encoder): call}), path


def _encoder_call(
    encoder: nn.Module,
    policy: Policy,
    level: str | Sequence[str],
    cache_dtype: torch.dtype | None,
    precision: str,
) -> EncoderCall:
    adapter = adapt_encoder(encoder)
    eventful_encoder = EventfulViT(
        adapter.description, policy, level, cache_dtype, adapter.taps, precision
    )
    return EncoderCall(eventful_encoder, adapter.format_output, adapter.check_arguments)


def _tokens(tokens: Tensor, pixel_values: Tensor) -> Tensor:
    return tokens


def _no_options(options: dict) -> None:
    if options:
        raise TypeError(f"an eventful.ViT encoder takes frames only, got options {options}")


def find_encoder(model: nn.Module) -> tuple[str, nn.Module]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside_found = any(name.startswith(prefix + ".") for prefix, _ in found)
        if not inside_found and is_encoder(module):
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
