"""Drift control: periodic, error-triggered and scene-cut refreshes fire at exactly the frames
the sequence demands, per stream, and the other streams of the batch run as they would have (up
to rounding: a refresh changes the row counts of the batch's matmuls; tests/helpers.py)."""

import pytest
import torch

import eventful
from eventful.core.drift import CUT_GRID
from eventful.synthetic import moving_squares
from tests.helpers import (
    LEVELS,
    SELECTION_MARGIN,
    MarginRecorder,
    assert_equal_up_to_rounding,
    tiny_vit,
)

NUM_TOKENS = 1 + 8 * 8


def converted(level="exact", k=8):
    return eventful.convert(tiny_vit(), policy=eventful.TopK(k), level=level)


def with_cut(frames_before, batch, cut_stream, cut_at, seed=1):
    """Moving squares for `batch` streams; stream `cut_stream` switches scene at `cut_at`."""
    video = moving_squares(frames_before, size=64, batch=batch, seed=seed)
    other = moving_squares(frames_before, size=64, batch=batch, seed=9)
    video[cut_at:, cut_stream] = other[cut_at:, cut_stream]
    return video


def events_of(stream):
    return [(event.frame, event.stream, event.kind) for event in stream.event_log]


def dense_frames(stream, frames, stream_index=0):
    """Indices of the frames that `stream_index` processed entirely."""
    dense = []
    for index, frame in enumerate(frames):
        stream(frame)
        if stream.updated_fraction()[stream_index] == pytest.approx(1.0):
            dense.append(index)
    return dense


def test_periodic_refresh_fires_every_n_frames_counting_from_the_first_frame():
    stream = converted().stream(drift=eventful.DriftControl(refresh_every=5))
    dense = dense_frames(stream, moving_squares(23, size=64, seed=2))
    assert dense == [0, 5, 10, 15, 20]  # frame 0 is the stream's first step: dense, no event
    assert events_of(stream) == [(f, 0, "periodic") for f in (5, 10, 15, 20)]
    assert all(event.value is None for event in stream.event_log)


def test_periodic_refresh_counts_from_each_streams_own_last_dense_step():
    stream = converted().stream(batch_size=2, drift=eventful.DriftControl(refresh_every=5))
    for index, frame in enumerate(moving_squares(17, size=64, batch=2, seed=3)):
        if index == 3:
            stream.reset([1])  # a dense step the caller asked for: no event
        stream(frame)
    assert events_of(stream) == [
        (5, 0, "periodic"),
        (8, 1, "periodic"),
        (10, 0, "periodic"),
        (13, 1, "periodic"),
        (15, 0, "periodic"),
    ]


def test_events_hold_the_last_step_and_event_log_all_of_them():
    stream = converted().stream(drift=eventful.DriftControl(refresh_every=2))
    video = moving_squares(5, size=64, seed=4)
    stream(video[0])
    assert stream.events == [] and stream.steps == 1
    stream(video[1])
    assert stream.events == []
    stream(video[2])
    assert stream.events == [eventful.DriftEvent(2, 0, "periodic")]
    stream(video[3])
    assert stream.events == []
    assert stream.event_log == [eventful.DriftEvent(2, 0, "periodic")]


@pytest.mark.parametrize("level", LEVELS)
def test_scene_cut_fires_at_the_cut_only_and_the_other_stream_runs_as_without_it(level):
    # Seed 11: no selection of the run is near a tie, so rounding cannot swap a token.
    video = with_cut(14, batch=2, cut_stream=1, cut_at=7, seed=11)
    recorder = MarginRecorder(eventful.TopK(8))
    model = eventful.convert(tiny_vit(), policy=recorder, level=level)
    plain = model.stream(batch_size=2, drift=None)
    expected = [plain(frame) for frame in video]
    assert recorder.margin > SELECTION_MARGIN
    watched = model.stream(batch_size=2, drift=eventful.DriftControl(scene_cut_factor=4))
    for frame, want in zip(video, expected, strict=True):
        assert_equal_up_to_rounding(watched(frame)[0], want[0])
    assert events_of(watched) == [(7, 1, "scene_cut")]
    assert watched.event_log[0].value > 4
    for got, want in zip(watched.state.blocks, plain.state.blocks, strict=True):
        for name in want:
            assert_equal_up_to_rounding(got[name][0], want[name][0])


def test_scene_cut_step_is_dense_for_the_cut_stream_only():
    video = with_cut(10, batch=2, cut_stream=1, cut_at=7)
    stream = converted().stream(batch_size=2, drift=eventful.DriftControl(scene_cut_factor=4))
    for frame in video[:8]:
        stream(frame)
    assert stream.updated_fraction() == pytest.approx([8 / NUM_TOKENS, 1.0])
    assert stream.trace.fresh_streams == [1]


def test_scene_cut_needs_a_history_of_changes_before_it_can_fire():
    # A cut at frame 2 follows only one measured change: too little to know what is usual.
    video = with_cut(8, batch=1, cut_stream=0, cut_at=2)
    stream = converted().stream(drift=eventful.DriftControl(scene_cut_factor=4))
    for frame in video:
        stream(frame)
    assert stream.event_log == []


def test_a_camera_that_moves_every_few_frames_in_a_still_scene_is_no_scene_cut():
    # A textured scene that pans by one pixel every fourth frame, still in between: the pan
    # frames change far more than the median frame (zero), but far less than a cut does.
    scene = moving_squares(1, size=96, num_squares=0)[0]
    video = [torch.roll(scene, shifts=t // 4, dims=-1)[..., :64, :64] for t in range(24)]
    stream = converted().stream(drift=eventful.DriftControl(scene_cut_factor=4))
    for frame in video:
        stream(frame)
    assert stream.event_log == []
    cut = torch.flip(video[-1], dims=(-1, -2))
    stream(cut)
    assert events_of(stream) == [(24, 0, "scene_cut")]


def detailed_scene(seed):
    """(3, 64, 256): large smooth shapes under fine pixel noise, like a real frame's detail."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.rand(1, 3, 3, 12, generator=generator)
    shapes = torch.nn.functional.interpolate(shapes, size=(64, 256), mode="bilinear")[0]
    return 3 * shapes + torch.rand(3, 64, 256, generator=generator)


@pytest.mark.parametrize("grid, fires", [(CUT_GRID, True), (10**6, False)])
def test_a_cut_that_follows_a_fast_pan_is_found_on_the_coarse_grid(monkeypatch, grid, fires):
    # A fast pan (4 pixels per frame) changes every pixel's detail, so at full resolution a cut
    # to another scene barely stands out against it; the cells' means move little with the pan
    # and a lot at the cut. A grid finer than the frame (10**6) compares at full resolution.
    monkeypatch.setattr("eventful.core.drift.CUT_GRID", grid)
    panning, other = detailed_scene(0), detailed_scene(1)
    video = [panning[..., 4 * t : 4 * t + 64] for t in range(12)] + [other[..., :64]]
    stream = converted().stream(drift=eventful.DriftControl(scene_cut_factor=4))
    for frame in video:
        stream(frame.unsqueeze(0))
    assert events_of(stream) == ([(12, 0, "scene_cut")] if fires else [])


def test_a_blank_input_that_stays_blank_is_no_cut_and_a_scene_that_appears_is_one():
    # A covered camera: every change and the contrast are zero, so the typical change is zero.
    blank = torch.zeros(1, 3, 64, 64)
    stream = converted().stream(drift=eventful.DriftControl(scene_cut_factor=4))
    for _ in range(6):
        stream(blank)
    assert stream.event_log == []
    stream(moving_squares(1, size=64)[0])
    assert events_of(stream) == [(6, 0, "scene_cut")]


def test_a_scene_cut_and_a_periodic_refresh_at_one_frame_record_one_event():
    video = with_cut(12, batch=1, cut_stream=0, cut_at=10)
    drift = eventful.DriftControl(refresh_every=5, scene_cut_factor=4)
    stream = converted().stream(drift=drift)
    for frame in video:
        stream(frame)
    assert events_of(stream) == [(5, 0, "periodic"), (10, 0, "scene_cut")]


def test_a_gates_unprocessed_share_is_its_unselected_change_over_n_times_its_scale():
    model = converted(k=3)
    stream = model.stream(batch_size=2, drift=None)
    video = moving_squares(6, size=64, batch=2, seed=5)
    for frame in video[:5]:
        stream(frame)
    reference = stream.state.blocks[0]["qkv_reference"].clone()
    tokens = model.embedding(video[5])
    # The scale: the mean token norm of the gate's input at the stream's last dense step (frame 0).
    scale = torch.linalg.vector_norm(model.embedding(video[0]), dim=-1).mean(1)
    assert torch.allclose(stream.state.blocks[0]["qkv_scale"], scale, rtol=1e-5)
    errors = torch.linalg.vector_norm(tokens - reference, dim=-1)
    stream(video[5])
    selected = stream.trace.blocks[0]["qkv"]
    share = stream.trace.unprocessed[0]["qkv"]
    for index, chosen in enumerate(selected.per_stream):
        left = torch.ones(NUM_TOKENS, dtype=torch.bool)
        left[chosen] = False
        expected = errors[index][left].sum() / (NUM_TOKENS * scale[index])
        assert torch.allclose(share[index], expected, rtol=1e-5)
        assert expected > 0
    every_gate = [gate for block in stream.trace.unprocessed for gate in block.values()]
    assert len(every_gate) == 3 * len(model.encoder.blocks)
    assert torch.allclose(stream.trace.unprocessed_share, torch.stack(every_gate).mean(0))


def test_the_unprocessed_share_of_a_dense_step_is_zero():
    stream = converted().stream(batch_size=2)
    stream(moving_squares(1, size=64, batch=2)[0])
    assert stream.trace.unprocessed_share.tolist() == [0.0, 0.0]


def test_error_bound_refreshes_a_stream_on_the_step_after_it_is_exceeded():
    video = moving_squares(20, size=64, batch=2, seed=6)
    recorder = MarginRecorder(eventful.TopK(4))
    model = eventful.convert(tiny_vit(), policy=recorder, level="exact")
    plain = model.stream(batch_size=2, count_ops=True, drift=None)
    shares, outputs = [], []
    for frame in video:
        outputs.append(plain(frame))
        shares.append(plain.trace.unprocessed_share.tolist())
    assert recorder.margin > SELECTION_MARGIN  # no near tie: rounding cannot swap a token
    # A bound that stream 0 first exceeds at frame 5, and stream 1 not before.
    bound = (shares[5][0] + max(row[0] for row in shares[:5])) / 2
    assert shares[5][0] > bound and max(row[1] for row in shares[:6]) < bound
    watched = model.stream(batch_size=2, drift=eventful.DriftControl(error_bound=bound))
    seen, compared = [], 0
    for index, frame in enumerate(video):
        output = watched(frame)
        seen.append(watched.trace.unprocessed_share.tolist())
        if not any(event.stream == 1 for event in watched.event_log):
            # Stream 0's dense steps change the batch's row counts, not stream 1's course.
            assert_equal_up_to_rounding(output[1], outputs[index][1])
            compared += 1
    assert compared > 7  # the comparison covers steps after stream 0's first refresh
    first = watched.event_log[0]
    assert (first.frame, first.stream, first.kind) == (6, 0, "error")
    assert first.value == pytest.approx(shares[5][0])
    # Every event follows a step above the bound, and every step above it triggers one.
    expected = [
        (index + 1, stream, "error")
        for index, row in enumerate(seen[:-1])
        for stream, share in enumerate(row)
        if share > bound
    ]
    assert events_of(watched) == expected


def test_error_bound_works_without_op_counts():
    stream = converted(k=4).stream(count_ops=False, drift=eventful.DriftControl(error_bound=0.0))
    video = moving_squares(4, size=64, seed=7)
    for frame in video:
        stream(frame)
    assert stream.ops is None
    # Frame 1 leaves some change: frame 2 runs densely, which leaves none; frame 3 leaves some.
    assert events_of(stream) == [(2, 0, "error")]


def test_drift_control_is_settings_shared_by_streams():
    drift = eventful.DriftControl(refresh_every=3)
    model = converted()
    first, second = model.stream(drift=drift), model.stream(drift=drift)
    video = moving_squares(4, size=64, seed=8)
    for frame in video:
        first(frame)
    second(video[0])
    assert events_of(first) == [(3, 0, "periodic")]
    assert events_of(second) == []


def test_a_restored_stream_keeps_its_drift_history(tmp_path):
    # Saved after 7 frames, restored into a new stream: the periodic refresh and the scene cut
    # still fire where they would have, and every output matches the original stream's.
    video = with_cut(14, batch=2, cut_stream=1, cut_at=11)
    drift = eventful.DriftControl(refresh_every=5, scene_cut_factor=4)
    model = converted()
    original = model.stream(batch_size=2, drift=drift)
    for frame in video[:7]:
        original(frame)
    torch.save(original.state_dict(), tmp_path / "stream.pt")
    restored = model.stream(batch_size=2, drift=drift)
    restored.load_state_dict(torch.load(tmp_path / "stream.pt"))
    for frame in video[7:]:
        assert torch.equal(restored(frame), original(frame))
        assert restored.events == original.events
    assert events_of(restored) == [(10, 0, "periodic"), (10, 1, "periodic"), (11, 1, "scene_cut")]


def test_a_drift_snapshot_for_another_batch_size_is_rejected_and_nothing_changes():
    drift = eventful.DriftControl(refresh_every=5)
    single = converted().stream(drift=drift)
    single(moving_squares(1, size=64)[0])
    pair = converted().stream(batch_size=2, drift=drift)
    with pytest.raises(ValueError, match="snapshot holds 1 streams, expected 2"):
        pair.load_state_dict(single.state_dict())
    assert pair.steps == 0 and not pair.state.allocated


def test_a_snapshot_without_drift_history_starts_the_triggers_from_its_step():
    video = moving_squares(14, size=64)
    plain = converted().stream(drift=None)
    for frame in video[:7]:
        plain(frame)
    watched = converted().stream(drift=eventful.DriftControl(refresh_every=5))
    watched.load_state_dict(plain.state_dict())
    for frame in video[7:]:
        watched(frame)
    assert events_of(watched) == [(12, 0, "periodic")]
