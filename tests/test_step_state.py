"""What a step keeps between calls (weights packed for the matrix library, state tensors sized for
one input size) survives everything a stream goes through: take and cat, snapshots, `Stream.to`,
reset, and a change of input size, which reallocates instead of reusing a buffer sized for
another input."""

import pytest
import torch

import eventful
from eventful.core import packed_linear
from eventful.core.packed_linear import PackedLinear
from eventful.synthetic import moving_squares
from tests.helpers import assert_equal_up_to_rounding, tiny_vit

LEVELS = ["tokenwise", "exact"]
POLICY = eventful.TopK(12)


def packed_layers(model) -> list[PackedLinear]:
    return [module for module in model.modules() if isinstance(module, PackedLinear)]


def unpacked_copy(vit, level):
    """The same conversion, every linear layer run by plain `F.linear` (no packed weight)."""
    model = eventful.convert(vit, policy=POLICY, level=level)
    for layer in packed_layers(model):
        layer._post_op = None  # the fallback path: nn.Linear, then its activation
    return model


def frames_of(size: int, steps: int = 6, seed: int = 3, batch: int = 1) -> torch.Tensor:
    return moving_squares(steps, size=size, batch=batch, seed=seed)


@pytest.mark.parametrize("level", LEVELS)
def test_the_packed_weights_are_used_and_follow_the_plain_linear_layers(level):
    vit = tiny_vit()
    model = eventful.convert(vit, policy=POLICY, level=level)
    packed, plain = model.stream(), unpacked_copy(vit, level).stream()
    with torch.inference_mode():
        for frame in frames_of(64):
            assert_equal_up_to_rounding(packed(frame), plain(frame))
    layers = packed_layers(model)
    assert layers  # every block's qkv, proj, fc1 and fc2
    if packed_linear.PREPACKED:  # oneDNN's packed copy, or the small-rows kernel's
        assert all(layer._packed is not None or layer._panels is not None for layer in layers)


@pytest.mark.parametrize("level", LEVELS)
def test_packed_state_survives_take_cat_snapshots_moves_and_resets(level):
    vit = tiny_vit()
    model = eventful.convert(vit, policy=POLICY, level=level)
    reference = unpacked_copy(vit, level)
    video = frames_of(64, steps=8, batch=2)
    stream, twin = model.stream(2), reference.stream(2)
    with torch.inference_mode():
        for frame in video[:3]:
            stream(frame)
            twin(frame)
        # Out of the batch and back in, through a snapshot, moved, and reset for stream 1.
        stream = eventful.Stream.cat([stream.take([0]), stream.take([1])])
        restored = model.stream(2)
        restored.load_state_dict(stream.state_dict())
        restored.to("cpu")
        assert_equal_up_to_rounding(restored(video[3]), twin(video[3]))
        restored.reset([1])
        twin.reset([1])
        for frame in video[4:]:
            assert_equal_up_to_rounding(restored(frame), twin(frame))


@pytest.mark.parametrize("level", LEVELS)
def test_a_change_of_input_size_reallocates_every_buffer_and_runs_densely(level):
    """Without a reset a new size is refused (tests/test_bad_input.py); after one, every state
    tensor is rebuilt for the new size."""
    vit = tiny_vit()
    model = eventful.convert(vit, policy=POLICY, level=level)
    stream = model.stream()
    small, large = frames_of(48), frames_of(64)
    with torch.inference_mode():
        for frame in large[:3]:
            stream(frame)
        before = {name: t.shape for name, t in stream.state.blocks[0].items()}
        with pytest.raises(ValueError, match="48x48 pixels differ from the 64x64"):
            stream(small[0])
        stream.reset()
        out = stream(small[0])
        after = {name: t.shape for name, t in stream.state.blocks[0].items()}
        # 1 + 6 x 6 tokens now, 1 + 8 x 8 before: a buffer sized for the other input is never read.
        assert stream.state.input_size == (48, 48)
        assert before["qkv_reference"][1] == 65 and after["qkv_reference"][1] == 37
        assert all(after[name] != before[name] for name in before if "scale" not in name)
        # The first step at the new size is dense: it equals a fresh stream's first step.
        assert torch.equal(out, model.stream()(small[0]))
        for frame in small[1:]:
            stream(frame)
        stream.reset()
        back = stream(large[3])  # and back: reallocated again, dense again
        assert stream.state.blocks[0]["qkv_reference"].shape[1] == 65
        assert torch.equal(back, model.stream()(large[3]))
