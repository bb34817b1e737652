"""Adapters from Hugging Face `transformers` encoders to the canonical `ViT`.

Supported encoders: `ViTModel`, `Dinov2Model`, `Dinov2WithRegistersModel` (transformers 5
module layout: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `mlp.fc1`, `mlp.fc2`). What conversion
reads, once: the patch projection, class token, registers and position embedding; per layer the
two LayerNorms, the q, k, v projections (fused into one qkv projection), the output projection,
LayerScale (DINOv2) and the MLP; the final LayerNorm; the ViT pooler. What it refuses: attention
implementations other than standard softmax attention, activations other than exact GELU, the
SwiGLU MLP, and per-head dimensions that do not split the hidden size evenly.

This module imports nothing from transformers: it reads modules by name, so transformers stays
an optional dependency until an output object is built.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from eventful.models.vit import ViT

SUPPORTED_ENCODERS = ("ViTModel", "Dinov2Model", "Dinov2WithRegistersModel")
# Implementations that all compute plain softmax attention, which the eventful blocks reproduce.
SUPPORTED_ATTENTION = (
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
)
# Encoder call options that do not change what the encoder computes.
IGNORED_OPTIONS = ("interpolate_pos_encoding", "return_dict")


def is_transformers_class(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether `module` is an instance of one of the transformers classes `names`."""
    cls = type(module)
    return cls.__module__.startswith("transformers.") and cls.__name__ in names


def is_hf_encoder(module: nn.Module) -> bool:
    return is_transformers_class(module, SUPPORTED_ENCODERS)


def unsupported(model: nn.Module, what: str) -> TypeError:
    """The one-line error of a conversion that cannot proceed."""
    return TypeError(f"cannot convert this {type(model).__name__}: {what}")


def _check_config(encoder: nn.Module) -> None:
    config = encoder.config
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in SUPPORTED_ATTENTION:
        raise unsupported(
            encoder,
            f"attention implementation {attention!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ATTENTION)}",
        )
    if config.hidden_act != "gelu":
        raise unsupported(
            encoder, f"activation {config.hidden_act!r} is not supported; expected 'gelu'"
        )
    if getattr(config, "use_swiglu_ffn", False):
        raise unsupported(encoder, "the SwiGLU MLP (use_swiglu_ffn=True) is not supported")


def _layers(encoder: nn.Module) -> nn.ModuleList:
    if type(encoder).__name__ == "ViTModel":
        return encoder.layers
    return encoder.encoder.layer


def _layer_parts(encoder: nn.Module, layer: nn.Module) -> dict[str, nn.Module | None]:
    """The modules of one layer, by canonical role."""
    is_vit = type(encoder).__name__ == "ViTModel"
    attention = layer.attention
    parts = {
        "norm1": layer.layernorm_before if is_vit else layer.norm1,
        "norm2": layer.layernorm_after if is_vit else layer.norm2,
        "q": getattr(attention, "q_proj", None),
        "k": getattr(attention, "k_proj", None),
        "v": getattr(attention, "v_proj", None),
        "o": getattr(attention, "o_proj", None),
        "fc1": getattr(layer.mlp, "fc1", None),
        "fc2": getattr(layer.mlp, "fc2", None),
        "ls1": None if is_vit else layer.layer_scale1,
        "ls2": None if is_vit else layer.layer_scale2,
    }
    missing = [name for name in ("q", "k", "v", "o", "fc1", "fc2") if parts[name] is None]
    if missing:
        raise unsupported(
            encoder,
            f"its layers lack {', '.join(missing)}; expected the transformers 5 layout "
            "(attention.q_proj/k_proj/v_proj/o_proj, mlp.fc1/fc2)",
        )
    return parts


def vit_from_hf(encoder: nn.Module) -> ViT:
    """The canonical ViT holding a copy of a transformers encoder's weights."""
    if not is_hf_encoder(encoder):
        raise unsupported(encoder, f"supported encoders: {', '.join(SUPPORTED_ENCODERS)}")
    _check_config(encoder)
    config = encoder.config
    embeddings = encoder.embeddings
    projection = embeddings.patch_embeddings.projection
    patch = projection.kernel_size[0]
    if projection.kernel_size != (patch, patch) or projection.stride != (patch, patch):
        raise unsupported(encoder, f"non-square or overlapping patches {projection.kernel_size}")
    positions = embeddings.position_embeddings.shape[1] - 1
    grid = round(positions**0.5)
    if grid * grid != positions:
        raise unsupported(encoder, f"{positions} patch positions do not form a square grid")
    layers = _layers(encoder)
    first = _layer_parts(encoder, layers[0])
    dim = config.hidden_size
    heads = config.num_attention_heads
    if first["q"].out_features != dim or dim % heads != 0:
        raise unsupported(
            encoder,
            f"{heads} heads of the q projection's {first['q'].out_features} features "
            f"do not split hidden size {dim} evenly",
        )
    is_dinov2 = type(encoder).__name__ != "ViTModel"
    registers = getattr(embeddings, "register_tokens", None)
    vit = ViT(
        image_size=grid * patch,
        patch_size=patch,
        dim=dim,
        depth=len(layers),
        heads=heads,
        mlp_ratio=first["fc1"].out_features / dim,
        in_chans=projection.in_channels,
        num_registers=0 if registers is None else registers.shape[1],
        layer_scale_init=1.0 if is_dinov2 else None,
        qkv_bias=first["q"].bias is not None,
        norm_eps=first["norm1"].eps,
        interpolate_antialias=type(encoder).__name__ == "Dinov2WithRegistersModel",
    )
    vit.load_state_dict(_canonical_state(encoder, layers, registers))
    return vit.to(projection.weight.dtype).eval()


def _canonical_state(
    encoder: nn.Module, layers: nn.ModuleList, registers: Tensor | None
) -> dict[str, Tensor]:
    embeddings = encoder.embeddings
    projection = embeddings.patch_embeddings.projection
    state = {
        "embedding.patch_projection.weight": projection.weight,
        "embedding.patch_projection.bias": projection.bias,
        "embedding.class_token": embeddings.cls_token,
        "embedding.position": embeddings.position_embeddings,
        "embedding.registers": (
            torch.zeros(1, 0, encoder.config.hidden_size) if registers is None else registers
        ),
        "norm.weight": encoder.layernorm.weight,
        "norm.bias": encoder.layernorm.bias,
    }
    for index, layer in enumerate(layers):
        parts = _layer_parts(encoder, layer)
        prefix = f"blocks.{index}."
        q, k, v = parts["q"], parts["k"], parts["v"]
        state[prefix + "attn.qkv.weight"] = torch.cat([q.weight, k.weight, v.weight])
        if q.bias is not None:
            state[prefix + "attn.qkv.bias"] = torch.cat([q.bias, k.bias, v.bias])
        for role, name in (
            ("o", "attn.proj"),
            ("fc1", "mlp.fc1"),
            ("fc2", "mlp.fc2"),
            ("norm1", "norm1"),
            ("norm2", "norm2"),
        ):
            state[prefix + name + ".weight"] = parts[role].weight
            state[prefix + name + ".bias"] = parts[role].bias
        if parts["ls1"] is not None:
            state[prefix + "ls1.gamma"] = parts["ls1"].lambda1
            state[prefix + "ls2.gamma"] = parts["ls2"].lambda1
    return {name: tensor.detach().clone() for name, tensor in state.items()}


class HFEncoderOutput(nn.Module):
    """Final-norm tokens (B, T, D) -> the `BaseModelOutputWithPooling` the encoder returned."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        # ViTModel pools with its own dense + activation head; DINOv2 takes the class token.
        pooler = getattr(encoder, "pooler", None)
        self.pooler = None if pooler is None else copy.deepcopy(pooler)
        self.pools_class_token = type(encoder).__name__ != "ViTModel"

    def forward(self, tokens: Tensor, pixel_values: Tensor | None = None) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if self.pools_class_token:
            pooled = tokens[:, 0]
        else:
            pooled = None if self.pooler is None else self.pooler(tokens)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=pooled)


def check_hf_encoder_options(options: dict) -> None:
    """Refuse encoder call options whose effect the eventful encoder cannot reproduce."""
    for name, value in options.items():
        if name in IGNORED_OPTIONS or value is None or value is False:
            continue
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else value
        raise ValueError(
            f"the eventful encoder does not support the option {name}={shown!r}; it returns "
            "the final hidden state (and pooler output) only, for unmasked inputs"
        )
