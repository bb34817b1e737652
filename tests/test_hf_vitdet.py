"""Hugging Face VitDetModel and VitDetBackbone: converted, they return what the originals return
(feature maps of every requested stage) when every token is selected."""

import pytest
import torch

import eventful
from tests.helpers import LEVELS
from tests.test_hf import randomized

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
TINY_VITDET = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "mlp_ratio": 2,
    "image_size": 64,
    "pretrain_image_size": 48,
    "patch_size": 8,
    "window_size": 3,
    "window_block_indices": [0, 2],
    "use_relative_position_embeddings": True,
}


def vitdet(cls_name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.VitDetConfig(**{**TINY_VITDET, **options})
    # randomized: the relative position tables start at zero; moved off it, the bias matters.
    return randomized(getattr(transformers, cls_name)(config))


def frames(steps: int, height: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(steps, 2, 3, height, width, generator=generator).cumsum(0) * 0.3


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("size", [(64, 64), (40, 72)])
def test_every_feature_map_of_the_backbone_equals_the_original(size, level):
    model = vitdet("VitDetBackbone", out_features=["stem", "stage1", "stage3"])
    num_tokens = (size[0] // 8) * (size[1] // 8)
    converted = eventful.convert(model, policy=eventful.TopK(num_tokens), level=level)
    stream = converted.stream(batch_size=2)
    with torch.no_grad():
        for frame in frames(4, *size):
            got, want = stream(frame), model(frame)
            assert type(got) is type(want) and len(got.feature_maps) == 3
            for got_map, want_map in zip(got.feature_maps, want.feature_maps, strict=True):
                torch.testing.assert_close(got_map, want_map, rtol=TOLERANCE, atol=TOLERANCE)


def test_the_model_without_absolute_positions_returns_its_last_feature_map():
    model = vitdet("VitDetModel")
    # What use_absolute_position_embeddings=False builds (transformers 5.24 fails to initialise
    # such a model itself): no absolute position embedding.
    model.embeddings.position_embeddings = None
    converted = eventful.convert(model, policy=eventful.Threshold(0.0), level="tokenwise")
    stream = converted.stream(batch_size=2)
    with torch.no_grad():
        for frame in frames(4, 64, 64):
            got, want = stream(frame), model(frame)
            assert type(got) is type(want)
            torch.testing.assert_close(
                got.last_hidden_state, want.last_hidden_state, rtol=TOLERANCE, atol=TOLERANCE
            )


@pytest.mark.parametrize("level", LEVELS)
def test_few_tokens_approximate_the_backbone_for_fewer_ops(level):
    model = vitdet("VitDetBackbone")
    converted = eventful.convert(model, policy=eventful.TopK(16), level=level)
    stream = converted.stream(batch_size=2, drift=None)
    with torch.no_grad():
        for frame in frames(5, 64, 64):
            got = stream(frame).feature_maps[-1]
        want = model(frame).feature_maps[-1]
    assert stream.ops.total < stream.ops.dense
    cosine = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)).min()
    assert cosine > 0.9


def test_residual_blocks_are_refused_in_one_line():
    model = vitdet("VitDetBackbone", residual_block_indices=[1])
    with pytest.raises(TypeError, match=r"residual blocks after layers \[1\] are not supported"):
        eventful.convert(model, policy=eventful.TopK(4), level="tokenwise")
