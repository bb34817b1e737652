"""Adapter for Hugging Face `VitDetModel` and `VitDetBackbone` (transformers 5).

What conversion reads, once: the patch projection and the absolute position embedding (its
class-token slot dropped, as VitDet does), per layer the two LayerNorms, the fused qkv and the
output projection, the MLP, the window size (VitDet's `window_block_indices` list the windowed
layers; the others attend globally) and the decomposed relative position tables. What it
refuses, in one line: the convolutional residual blocks (`residual_block_indices`),
activations other than exact GELU, and rectangular patches or pretraining sizes.

The converted model returns what the original returns: `VitDetModel` its last feature map in
a `BaseModelOutput`; `VitDetBackbone` a `BackboneOutput` with the feature maps of its
`out_features` stages ("stem" is the embedding, "stageI" block I's output). Hidden states and
attention maps are not available from the eventful encoder. This module imports nothing from
transformers until an output object is built.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from eventful.core.bias import DecomposedRelativePosition
from eventful.core.description import AttentionDescription, BlockDescription, EncoderDescription
from eventful.core.partition import Windows
from eventful.models.hf import is_transformers_class, unsupported
from eventful.models.vit import TokenEmbedding

SUPPORTED_VITDET = ("VitDetModel", "VitDetBackbone")


def is_hf_vitdet(module: nn.Module) -> bool:
    return is_transformers_class(module, SUPPORTED_VITDET)


def _single(value: Any, what: str, model: nn.Module) -> int:
    """A size given as an int or a square pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise unsupported(model, f"{what} {tuple(value)} is not square")
        value = value[0]
    return int(value)


def _check_config(model: nn.Module) -> None:
    config = model.config
    if config.residual_block_indices:
        raise unsupported(
            model,
            f"the convolutional residual blocks after layers {list(config.residual_block_indices)}"
            " are not supported",
        )
    if config.hidden_act != "gelu":
        raise unsupported(
            model, f"activation {config.hidden_act!r} is not supported; expected 'gelu'"
        )


def _embedding(model: nn.Module) -> TokenEmbedding:
    config = model.config
    embeddings = model.embeddings
    patch = _single(config.patch_size, "patch size", model)
    pretrain = _single(config.pretrain_image_size, "pretraining size", model)
    embedding = TokenEmbedding(
        pretrain, patch, config.hidden_size, config.num_channels, class_token=False
    )
    with torch.no_grad():
        embedding.patch_projection.load_state_dict(embeddings.projection.state_dict())
        if embeddings.position_embeddings is None:
            embedding.position.zero_()
        else:
            positions = embeddings.position_embeddings[:, 1:]  # the class-token slot is unused
            grid = math.isqrt(positions.shape[1])
            if grid * grid != positions.shape[1] or grid != embedding.grid:
                raise unsupported(
                    model,
                    f"{positions.shape[1]} absolute positions do not form the {embedding.grid}x"
                    f"{embedding.grid} grid of the pretraining size {pretrain}",
                )
            embedding.position.copy_(positions)
    return embedding.to(embeddings.projection.weight.dtype)


def _block(layer: nn.Module) -> BlockDescription:
    attention = layer.attention
    heads = attention.num_heads
    bias = None
    if attention.use_relative_position_embeddings:
        bias = DecomposedRelativePosition(attention.rel_pos_h, attention.rel_pos_w)
    return BlockDescription(
        norm1=layer.norm1,
        qkv=attention.qkv,
        proj=attention.proj,
        norm2=layer.norm2,
        fc1=layer.mlp.fc1,
        activation=nn.GELU(),
        fc2=layer.mlp.fc2,
        attention=AttentionDescription(
            heads=heads,
            scale=attention.scale,
            window=Windows(layer.window_size) if layer.window_size > 0 else None,
            bias=bias,
        ),
    )


def describe_hf_vitdet(model: nn.Module) -> EncoderDescription:
    """The engine's description of a transformers VitDet model (reads its modules once)."""
    if not is_hf_vitdet(model):
        raise unsupported(model, f"supported VitDet classes: {', '.join(SUPPORTED_VITDET)}")
    _check_config(model)
    blocks = tuple(_block(layer) for layer in model.encoder.layer)
    return EncoderDescription(_embedding(model), blocks, nn.Identity())


def tapped_stages(model: nn.Module) -> tuple[int, ...]:
    """The stages (0: stem, i: stage i) whose feature maps the model returns."""
    if type(model).__name__ == "VitDetModel":
        return ()
    return tuple(model.config.stage_names.index(name) for name in model.out_features)


class VitDetOutput(nn.Module):
    """The eventful encoder's tokens -> what the VitDet model returned (feature maps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.is_backbone = type(model).__name__ == "VitDetBackbone"
        self.patch_size = _single(model.config.patch_size, "patch size", model)

    def _map(self, tokens: Tensor, pixel_values: Tensor) -> Tensor:
        rows = pixel_values.shape[-2] // self.patch_size
        cols = pixel_values.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols)

    def forward(self, encoded: Any, pixel_values: Tensor) -> Any:
        if self.is_backbone:
            from transformers.modeling_outputs import BackboneOutput

            _, tapped = encoded
            maps = tuple(self._map(tokens, pixel_values) for tokens in tapped)
            return BackboneOutput(feature_maps=maps)
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=self._map(encoded, pixel_values))


def check_vitdet_options(options: dict) -> None:
    """Refuse call options whose effect the eventful encoder cannot reproduce."""
    for name, value in options.items():
        if value is None or (value is False and name != "return_dict"):
            continue
        if name == "return_dict" and value is True:
            continue
        raise ValueError(
            f"the eventful VitDet encoder does not support the option {name}={value!r}; it "
            "returns the feature maps only"
        )
