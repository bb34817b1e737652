"""Half-precision attention caches (float16, bfloat16): half the N x N memory, a bounded fidelity
cost."""

import io

import pytest
import torch

import eventful
from tests.helpers import tiny_vit

NUM_TOKENS = 65


HALVED = {"qk": ("query_key_product",), "full": ("attention_reference",)}
HALF_DTYPES = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("level", ["qk", "full"])
def test_half_precision_halves_the_square_caches(level, dtype, video):
    vit = tiny_vit()
    sizes = {}
    for cache_dtype in (None, dtype):
        stream = eventful.convert(vit, eventful.TopK(8), level, cache_dtype=cache_dtype).stream()
        stream(video[0])
        halved = [stream.state.blocks[0][name] for name in HALVED[level]]
        assert all(t.dtype == (cache_dtype or torch.float32) for t in halved)
        kept = [t for name, t in stream.state.blocks[0].items() if name not in HALVED[level]]
        assert all(t.dtype == torch.float32 for t in kept)  # running sums, buffers, references
        sizes[cache_dtype] = (
            stream.state.nbytes(),
            sum(t.numel() * t.element_size() for t in halved),
        )
    saved = sizes[None][0] - sizes[dtype][0]
    assert saved == sizes[None][1] // 2 * 3  # three blocks, each halved cache halved


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("level", ["qk", "full"])
def test_half_precision_with_every_token_stays_close_to_dense(level, dtype, bound, video):
    vit = tiny_vit(layer_scale_init=0.5)
    model = eventful.convert(vit, eventful.TopK(NUM_TOKENS), level, cache_dtype=dtype)
    stream = model.stream()
    worst = max((stream(frame) - vit(frame)).abs().max().item() for frame in video)
    assert worst < bound


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_query_key_updates_stay_close_to_float32_caches(dtype, video):
    """With a sparse policy the qk level updates its cached logits' rows and columns: the
    half-precision logits follow the float32 ones. (The full level's half-precision attention
    reference drifts further under updates; its cost on real video is in BENCHMARKS.md.)"""
    level = "qk"
    vit = tiny_vit(layer_scale_init=0.5)
    streams = [
        eventful.convert(vit, eventful.TopK(16), level, cache_dtype=cache_dtype).stream(drift=None)
        for cache_dtype in (None, dtype)
    ]
    worst = 0.0
    for frame in video:
        reference, half = (stream(frame) for stream in streams)
        worst = max(worst, (half - reference).abs().max().item())
    assert worst < (2e-3 if dtype == torch.float16 else 2e-2)


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
