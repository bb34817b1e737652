"""Content changes: a frame that changes by a large share of its contrast (a cut in a stream's
first frames, a scene appearing from black, one colour or a faint frame, a flash) runs densely
without waiting for history; noise on a dark camera and ordinary motion on real clips do not."""

import pytest
import torch

import eventful
from eventful.core.drift import CONTENT_MIN_CHANGE
from eventful.synthetic import moving_squares
from tests.helpers import tiny_vit

CONTENT_ONLY = eventful.DriftControl(content_change=0.3)


def events_of(stream):
    return [(event.frame, event.stream, event.kind) for event in stream.event_log]


def run(frames, drift=CONTENT_ONLY):
    stream = eventful.convert(tiny_vit(), policy=eventful.TopK(8)).stream(drift=drift)
    for frame in frames:
        stream(frame)
    return stream


@pytest.mark.parametrize("cut_at", [1, 2])
def test_a_cut_in_the_first_frames_refreshes_at_the_cut(cut_at):
    video = moving_squares(8, size=64, seed=1)
    video[cut_at:] = moving_squares(8, size=64, seed=9)[cut_at:]
    stream = run(video)
    assert events_of(stream) == [(cut_at, 0, "content_change")]
    assert stream.event_log[0].value > 0.3


@pytest.mark.parametrize(
    "lead",
    [
        pytest.param(lambda scene: torch.full_like(scene, -2.0), id="black"),
        pytest.param(lambda scene: torch.full_like(scene, 0.7), id="one-colour"),
        pytest.param(lambda scene: scene.mean() + 0.05 * (scene - scene.mean()), id="faint"),
    ],
)
def test_a_scene_that_appears_from_a_featureless_frame_refreshes_at_once(lead):
    video = moving_squares(6, size=64, seed=2)
    video[0] = lead(video[0])
    stream = run(video)
    assert events_of(stream) == [(1, 0, "content_change")]


def test_a_letterboxed_scene_that_appears_from_a_faint_frame_refreshes_at_once():
    # Black bars above and below: the frame's contrast is mostly bars against content, so the
    # change from faint to full content is a small share of it; the detail grows 20-fold.
    video = moving_squares(6, size=64, seed=2)
    content = video[0, :, :, 16:48]
    video[0, :, :, 16:48] = content.mean() + 0.05 * (content - content.mean())
    video[:, :, :, :16] = video[:, :, :, 48:] = -2.0
    stream = run(video)
    assert events_of(stream) == [(1, 0, "content_change")]
    assert stream.event_log[0].value < 0.3  # the contrast test alone would not have fired


def test_a_flash_refreshes_on_entering_and_on_leaving_it():
    video = moving_squares(8, size=64, seed=3)
    video[4] = 2.5
    assert events_of(run(video)) == [(4, 0, "content_change"), (5, 0, "content_change")]


def test_noise_on_a_dark_still_camera_is_not_content():
    generator = torch.Generator().manual_seed(0)
    dark = torch.full((12, 1, 3, 64, 64), -2.0)
    dark += 0.05 * torch.randn(dark.shape, generator=generator)  # the cell means move < 0.02
    assert run(dark).event_log == []


def test_a_small_change_of_a_featureless_frame_is_below_the_floor():
    video = torch.full((4, 1, 3, 64, 64), -2.0)
    video[2:] += CONTENT_MIN_CHANGE / 2  # all content is gone, and it brightens a little
    assert run(video).event_log == []


@pytest.mark.parametrize("levels", [[0.75, 0.5, 0.25, 0.0], [0.0, 0.25, 0.5, 0.75, 1.0]])
def test_a_fade_refreshes_at_least_every_other_frame(levels):
    video = moving_squares(4 + len(levels), size=64, seed=5) + 2.0  # black at 0
    for index, level in enumerate(levels, start=4):
        video[index] *= level
    refreshed = [frame for frame, _, kind in events_of(run(video)) if kind == "content_change"]
    fade = range(4, 4 + len(levels))
    assert all(frame in refreshed or frame - 1 in refreshed for frame in fade), refreshed


def test_a_slow_change_of_contrast_refreshes_once_it_exceeds_a_quarter():
    video = moving_squares(10, size=64, seed=6) + 2.0
    for index in range(10):
        video[index] *= 1.05**index  # 5% brighter every frame: ordinary exposure drift
    refreshed = [frame for frame, _, _ in events_of(run(video))]
    assert refreshed == [5]  # 1.05 ** 5 = 1.28


def test_ordinary_motion_of_the_synthetic_scene_is_not_content():
    assert run(moving_squares(30, size=64, seed=4)).event_log == []


# The cuts of bikes.mp4, checked by eye (BENCHMARKS.md, "scene-cuts"); the other clips have none.
REGISTRY_CUTS = {
    "bikes.mp4": [30, 76, 137, 187, 242],
    "bigbuckbunny.mp4": [],
    "carphone_pristine.mp4": [],
    "carphone_distorted.mp4": [],
}


@pytest.mark.parametrize("clip", REGISTRY_CUTS)
def test_the_default_cut_triggers_fire_at_the_cuts_of_the_registry_clips_and_rarely_else(clip):
    from eventful.video.clips import registry_clip
    from eventful.video.decode import decode_frames
    from eventful.video.preprocess import letterbox

    monitor = eventful.DEFAULT_DRIFT.monitor(batch_size=1)
    fired = {}
    for index, rgb in enumerate(decode_frames(registry_clip(clip))):
        frames = letterbox(rgb).unsqueeze(0)
        plan = monitor.plan(frames, index, fresh=[index == 0])
        fired |= {event.frame: event.kind for event in plan.events if event.kind != "periodic"}
        dense = plan.streams or ([0] if index == 0 else [])
        monitor.commit(plan, frames, index, dense_streams=dense, unprocessed_share=None)
    cuts = REGISTRY_CUTS[clip]
    assert [frame for frame in cuts if frame in fired] == cuts
    # Besides the cuts, only a change of the frame's contrast by a quarter since the last dense
    # step (the pans of bikes.mp4 that turn to brighter scenery): at most once per 60 frames, and
    # never on the still clips. A stream's error refreshes would reset the contrast more often.
    others = {frame: kind for frame, kind in fired.items() if frame not in cuts}
    assert set(others.values()) <= {"content_change"}
    limit = (index + 1) // 60 if cuts else 0
    assert len(others) <= limit, others


def test_a_snapshot_from_before_the_contrast_trigger_loads_and_the_trigger_starts_afresh():
    monitor = eventful.DEFAULT_DRIFT.monitor(batch_size=2)
    snapshot = monitor.state_dict()
    del snapshot["dense_contrast"]  # what earlier versions saved
    restored = eventful.DEFAULT_DRIFT.monitor(batch_size=2)
    restored.load_state_dict(snapshot)
    assert restored.dense_contrast == [None, None]
    assert not restored.contrast_changed(0, 5.0)  # no reference yet: nothing to compare
