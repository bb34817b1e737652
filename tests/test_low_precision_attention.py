"""Attention in bfloat16 from the buffer rounded at once (`EventfulBlock._low_precision_heads`),
or at the tokenwise level from a buffer that holds its rows rounded as they are written
(`EventfulBlock._qkv_dtype`), equals attention from q, k and v each rounded from their views of
a float32 buffer, bit for bit, and so does the exact level's output taken from its recompute
instead of its numerator."""

import pytest
import torch

import eventful
from eventful.core import block as block_module
from eventful.core import precision
from eventful.synthetic import moving_squares
from tests.helpers import tiny_vit


def run(converted, video, batch):
    """Outputs of a stream over the video, and its state after the last step."""
    stream = converted.stream(batch_size=batch)
    with torch.inference_mode():
        outputs = torch.stack([stream(frames[:batch]) for frames in video])
    state = [tensor.clone() for block in stream.state.blocks for tensor in block.values()]
    return outputs, state


@pytest.mark.parametrize("level", ["tokenwise", "exact"])
@pytest.mark.parametrize("share", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("batch", [1, 3])
def test_attention_from_the_rounded_buffer_equals_per_view_rounding(
    level, share, batch, monkeypatch
):
    # bf16 is refused where the CPU lacks native bfloat16; the arithmetic is PyTorch's either way.
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    vit = tiny_vit()
    converted = eventful.convert(
        vit, policy=eventful.TopFraction(share), level=level, precision="bf16"
    )
    squares = moving_squares(6, size=80, batch=3, seed=5)
    video = squares[..., 16:64, :]  # frames of 48 x 80 for a model made at 64 x 64
    rounded_at_once = run(converted, video, batch)
    monkeypatch.setattr(block_module.EventfulBlock, "_low_precision_heads", lambda *_: None)
    monkeypatch.setattr(block_module.EventfulBlock, "_qkv_dtype", lambda _, dtype: dtype)
    per_view = run(converted, video, batch)
    assert torch.equal(rounded_at_once[0], per_view[0])
    assert len(rounded_at_once[1]) == len(per_view[1])
    for ours, theirs in zip(rounded_at_once[1], per_view[1], strict=True):
        # The tokenwise level's qkv buffer holds the float32 one's values rounded.
        assert ours.dtype == theirs.dtype or (level, ours.dtype) == ("tokenwise", torch.bfloat16)
        assert torch.equal(ours, theirs.to(ours.dtype))


def test_rounded_heads_only_where_attention_runs_in_a_lower_precision(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    vit = tiny_vit()
    for chosen, expected in (("bf16", torch.bfloat16), ("fp32", None)):
        converted = eventful.convert(vit, eventful.TopK(4), level="exact", precision=chosen)
        block = converted.encoder.blocks[0]
        qkv = torch.randn(2, 17, 3 * block.dim)
        layout = block.layout(None, 17, qkv.device)
        heads = block._low_precision_heads(qkv, layout)
        if expected is None:
            assert heads is None
        else:
            assert all(head.dtype == expected for head in heads)
            q = qkv.view(2, 17, 3, block.heads, -1)[:, :, 0].transpose(1, 2)
            assert torch.equal(heads[0], q.to(expected))
