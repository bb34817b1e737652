"""Stream state: policy changes, partial resets, save and restore, devices, memory."""

import io

import pytest
import torch

import eventful
from eventful.synthetic import moving_squares
from tests.helpers import (
    LEVELS,
    SELECTION_MARGIN,
    MarginRecorder,
    assert_equal_up_to_rounding,
    tiny_vit,
)

NUM_TOKENS = 65  # 64x64 input, 8x8 patches, plus the class token


@pytest.mark.parametrize("level", LEVELS)
def test_policy_change_mid_stream_takes_effect_without_a_reset(level, video):
    vit = tiny_vit()
    model = eventful.convert(vit, policy=eventful.TopK(6), level=level)
    stream = model.stream()
    for frame in video[:5]:
        stream(frame)
    assert stream.trace.blocks[0]["qkv"].counts == [6]
    model.policy = eventful.TopK(20)
    stream(video[5])
    assert stream.trace.fresh_streams == []
    assert all(sel.counts == [20] for block in stream.trace.blocks for sel in block.values())
    model.policy = eventful.TopK(NUM_TOKENS)
    # Every token re-processed from stale caches gives the dense output again.
    output = stream(video[6])
    assert torch.allclose(output, vit(video[6]), atol=1e-4)
    model.policy = eventful.Threshold(float("inf"))
    stream(video[7])
    assert all(sel.counts == [0] for block in stream.trace.blocks for sel in block.values())
    assert stream.ops.by_category["linear"] == 0


@pytest.mark.parametrize("level", LEVELS)
def test_resetting_one_stream_leaves_the_others_on_their_course(level):
    recorder = MarginRecorder(eventful.TopK(10))
    model = eventful.convert(tiny_vit(), policy=recorder, level=level)
    # Seed 2: no selection of the batch's run is near a tie, so rounding cannot swap a token.
    video = moving_squares(8, size=64, batch=3, seed=2)
    batched = model.stream(batch_size=3)
    for frame in video[:5]:
        batched(frame)
    batched.reset([1])
    outputs = [batched(frame) for frame in video[5:]]
    assert recorder.margin > SELECTION_MARGIN
    # Streams 0 and 2 equal single streams that saw no reset, up to rounding: the reset
    # changes the row counts of the batch's matmuls.
    for index in (0, 2):
        single = model.stream()
        for frame in video[:5]:
            single(frame[index : index + 1])
        for frame, output in zip(video[5:], outputs, strict=True):
            assert_equal_up_to_rounding(output[index : index + 1], single(frame[index : index + 1]))
    # The reset stream started over: it equals a stream that began at frame 5.
    restarted = model.stream()
    for frame, output in zip(video[5:], outputs, strict=True):
        assert_equal_up_to_rounding(output[1:2], restarted(frame[1:2]))


def test_reset_stream_runs_its_next_step_densely_and_reports_it():
    vit = tiny_vit()
    model = eventful.convert(vit, policy=eventful.TopK(10), level="full")
    video = moving_squares(4, size=64, batch=2, seed=3)
    stream = model.stream(batch_size=2)
    stream(video[0])
    stream(video[1])
    stream.reset([0])
    output = stream(video[2])
    assert stream.trace.fresh_streams == [0]
    assert stream.trace.blocks[0]["qkv"].counts == [NUM_TOKENS, 10]
    assert stream.ops.per_stream[0]["linear"] > stream.ops.per_stream[1]["linear"]
    assert torch.allclose(output[0:1], vit(video[2][0:1]), atol=1e-4)


@pytest.mark.parametrize("level", LEVELS)
def test_restored_stream_continues_bit_identically(level):
    vit = tiny_vit(layer_scale_init=0.5)
    model = eventful.convert(vit, policy=eventful.Threshold(0.6), level=level)
    video = moving_squares(12, size=64, batch=2, seed=5)
    original = model.stream(batch_size=2)
    for frame in video[:6]:
        original(frame)
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)
    continued = [original(frame) for frame in video[6:]]
    restored = model.stream(batch_size=2)
    saved.seek(0)
    restored.load_state_dict(torch.load(saved))
    for frame, expected in zip(video[6:], continued, strict=True):
        assert torch.equal(restored(frame), expected)


def test_snapshot_is_not_changed_by_later_steps(video):
    stream = eventful.convert(tiny_vit(), policy=eventful.TopK(8)).stream()
    stream(video[0])
    snapshot = stream.state_dict()
    before = snapshot["blocks"][0]["qkv"].clone()
    stream(video[1])
    assert torch.equal(snapshot["blocks"][0]["qkv"], before)
    assert not torch.equal(stream.state.blocks[0]["qkv"], before)


def test_snapshot_for_another_batch_size_is_rejected(video):
    stream = eventful.convert(tiny_vit(), policy=eventful.TopK(8)).stream(batch_size=2)
    with pytest.raises(ValueError, match="snapshot holds 2 streams, expected 1"):
        eventful.convert(tiny_vit(), policy=eventful.TopK(8)).stream().load_state_dict(
            stream.state_dict()
        )


def test_one_model_serves_independent_stream_batches(video):
    model = eventful.convert(tiny_vit(), policy=eventful.TopK(8), level="full")
    first, second = model.stream(), model.stream()
    for frame in video[:4]:
        first(frame)
    outputs = [second(frame) for frame in video[:4]]
    fresh = model.stream()
    assert all(torch.equal(fresh(f), o) for f, o in zip(video[:4], outputs, strict=True))


@pytest.mark.parametrize(
    ("level", "per_block"),
    [
        # refs and buffers: 5 x (N, D) + (N, 3D)
        ("tokenwise", (5 + 3) * NUM_TOKENS * 48),
        # + the query-key product (H, N, N)
        ("qk", (5 + 3) * NUM_TOKENS * 48 + 4 * NUM_TOKENS**2),
        # + the attention reference (H, N, N), the attention-value product (N, D) and the
        # running log-sum-exp sums (denominators and shifts, H x N): no query-key product
        ("full", (5 + 3 + 1) * NUM_TOKENS * 48 + 4 * NUM_TOKENS**2 + 2 * 4 * NUM_TOKENS),
        # + the running numerators (N, D), denominators and shifts (H, N): no N x N cache
        ("exact", (5 + 3 + 1) * NUM_TOKENS * 48 + 2 * 4 * NUM_TOKENS),
    ],
)
def test_cache_bytes_per_stream_are_reported(level, per_block, video):
    stream = eventful.convert(tiny_vit(), policy=eventful.TopK(8), level=level).stream(2)
    assert stream.state.nbytes() == 0
    stream(torch.cat([video[0], video[0]]))
    # Every block also keeps its 3 gates' scales, one float each.
    assert stream.state.nbytes_per_stream() == 3 * (per_block + 3) * 4


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_stream_to_cpu_moves_model_and_state_and_continues_identically(device, video):
    model = eventful.convert(tiny_vit(), policy=eventful.TopK(8), level="full")
    moved, twin = model.stream(), model.stream()
    for frame in video[:3]:
        moved(frame)
        twin(frame)
    assert moved.to(device) is moved
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert moved.state.device.type == "cpu"
    assert all(t.device.type == "cpu" for block in moved.state.blocks for t in block.values())
    for frame in video[3:8]:
        assert torch.equal(moved(frame), twin(frame))  # the same shapes: bit for bit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_moves_between_devices_and_continues(video):
    model = eventful.convert(tiny_vit(), policy=eventful.TopK(8), level="full")
    on_cpu = model.stream()
    for frame in video[:3]:
        on_cpu(frame)
    snapshot = on_cpu.state_dict()
    expected = on_cpu(video[3])
    moved = model.stream()
    moved.load_state_dict(snapshot)
    moved.to("cuda")
    output = moved(video[3].cuda())
    assert torch.allclose(output.cpu(), expected, atol=1e-4)


@pytest.mark.parametrize("level", ["tokenwise", "exact"])
def test_compiled_stream_gives_the_eager_outputs_and_counts(level):
    model = eventful.convert(tiny_vit(), policy=eventful.TopK(9), level=level)
    video = moving_squares(4, size=64, batch=2, seed=6)
    eager, compiled = model.stream(2), model.stream(2, compile=True)
    for frame in video:
        assert torch.allclose(compiled(frame), eager(frame), atol=1e-5)
        assert compiled.ops.per_stream == eager.ops.per_stream
