"""Half-precision attention caches: half the N x N memory, a bounded fidelity cost."""

import io

import pytest
import torch

import eventful
from tests.helpers import tiny_vit

NUM_TOKENS = 65


@pytest.mark.parametrize("level", ["qk", "full"])
def test_half_precision_halves_the_square_caches(level, video):
    vit = tiny_vit()
    sizes = {}
    for dtype in (None, torch.float16):
        stream = eventful.convert(vit, eventful.TopK(8), level, cache_dtype=dtype).stream()
        stream(video[0])
        squares = [
            t
            for name, t in stream.state.blocks[0].items()
            if t.dim() == 4 and t.shape[-1] == t.shape[-2] == NUM_TOKENS
        ]
        assert squares and all(t.dtype == (dtype or torch.float32) for t in squares)
        sizes[dtype] = (stream.state.nbytes(), sum(t.numel() * t.element_size() for t in squares))
    saved = sizes[None][0] - sizes[torch.float16][0]
    assert saved == sizes[None][1] // 2 * 3  # three blocks, each square cache halved


@pytest.mark.parametrize("level", ["qk", "full"])
def test_half_precision_with_every_token_stays_close_to_dense(level, video):
    vit = tiny_vit(layer_scale_init=0.5)
    model = eventful.convert(vit, eventful.TopK(NUM_TOKENS), level, cache_dtype=torch.float16)
    stream = model.stream()
    worst = max((stream(frame) - vit(frame)).abs().max().item() for frame in video)
    assert worst < 2e-2


def test_half_precision_state_restores_bit_identically(video):
    model = eventful.convert(tiny_vit(), eventful.TopK(8), "full", cache_dtype=torch.float16)
    original = model.stream()
    for frame in video[:4]:
        original(frame)
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)
    expected = [original(frame) for frame in video[4:8]]
    saved.seek(0)
    restored = model.stream()
    restored.load_state_dict(torch.load(saved))
    assert all(torch.equal(restored(f), e) for f, e in zip(video[4:8], expected, strict=True))


@pytest.mark.parametrize("dtype", [torch.int8, "float16", torch.bool])
def test_a_cache_dtype_that_is_not_floating_point_is_rejected(dtype):
    with pytest.raises(ValueError, match="cache_dtype must be a floating-point torch dtype"):
        eventful.convert(tiny_vit(), eventful.TopK(8), "full", cache_dtype=dtype)
