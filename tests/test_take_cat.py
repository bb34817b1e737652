"""Cameras that join and leave a batch: streams taken out of a batch and merged into another
continue as if they had run alone; snapshots are tied to a format and a model."""

import dataclasses

import pytest
import torch

import eventful
from eventful.synthetic import moving_squares
from tests.helpers import assert_equal_up_to_rounding, tiny_vit
from tests.test_vitdet import tiny_vitdet

POLICY = eventful.TopFraction(0.3)


def camera(seed: int, steps: int = 8) -> torch.Tensor:
    """(steps, 1, 3, 64, 64) frames of one camera."""
    return moving_squares(steps, size=64, batch=1, seed=seed)


@pytest.mark.parametrize("make", [tiny_vit, tiny_vitdet], ids=["vit", "vitdet"])
@pytest.mark.parametrize("level", ["exact", "full"])
def test_streams_merged_into_a_batch_continue_as_if_alone(make, level):
    model = eventful.convert(make(), policy=POLICY, level=level)
    cameras = [camera(seed) for seed in (1, 2)]
    alone = [model.stream() for _ in cameras]
    for step in range(3):
        for stream, frames in zip(alone, cameras, strict=True):
            stream(frames[step])
    joined = eventful.Stream.cat(alone)
    assert joined.batch_size == 2 and joined.steps == 3
    for step in range(3, 8):
        together = joined(torch.cat([frames[step] for frames in cameras]))
        for index, (stream, frames) in enumerate(zip(alone, cameras, strict=True)):
            assert_equal_up_to_rounding(together[index : index + 1], stream(frames[step]))


@pytest.mark.parametrize("make", [tiny_vit, tiny_vitdet], ids=["vit", "vitdet"])
def test_streams_taken_out_of_a_batch_continue_as_in_it(make):
    model = eventful.convert(make(), policy=POLICY, level="exact")
    cameras = [camera(seed) for seed in (1, 2, 3)]
    batch = model.stream(batch_size=3)
    for step in range(3):
        batch(torch.cat([frames[step] for frames in cameras]))
    taken = batch.take([2, 0])
    assert taken.batch_size == 2 and taken.steps == 3
    for step in range(3, 8):
        together = batch(torch.cat([frames[step] for frames in cameras]))
        apart = taken(torch.cat([cameras[2][step], cameras[0][step]]))
        assert_equal_up_to_rounding(apart, together[[2, 0]])


def test_a_new_camera_joins_fresh_and_runs_its_first_step_densely():
    vit = tiny_vit()
    model = eventful.convert(vit, policy=POLICY, level="exact")
    running = model.stream()
    first, second = camera(1), camera(2)
    for step in range(3):
        running(first[step])
    joined = eventful.Stream.cat([running, model.stream()])
    output = joined(torch.cat([first[3], second[0]]))
    assert joined.trace.fresh_streams == [1]
    with torch.no_grad():
        assert_equal_up_to_rounding(output[1:], vit(second[0]))


def test_each_camera_keeps_its_own_refresh_schedule_after_joining():
    drift = dataclasses.replace(eventful.DEFAULT_DRIFT, refresh_every=6)
    model = eventful.convert(tiny_vit(), policy=POLICY, level="exact")
    older, newer = model.stream(drift=drift), model.stream(drift=drift)
    frames = camera(1, 16)
    for step in range(4):
        older(frames[step])
    newer(frames[0])
    joined = eventful.Stream.cat([older, newer])
    refreshed = []
    for step in range(4, 12):
        joined(torch.cat([frames[step], frames[step]]))
        refreshed += [(step, event.stream) for event in joined.events if event.kind == "periodic"]
    # older's last dense step was 0: refreshed 6 frames later; newer's was 3 frames later
    assert refreshed[:2] == [(6, 0), (9, 1)]


def test_bad_take_and_cat_are_refused():
    model = eventful.convert(tiny_vit(), policy=POLICY)
    other = eventful.convert(tiny_vit(seed=1), policy=POLICY)
    stream = model.stream(batch_size=2)
    stream(torch.cat([camera(1)[0], camera(2)[0]]))
    with pytest.raises(IndexError, match="stream index 2 out of range for a batch of 2"):
        stream.take([2])
    with pytest.raises(ValueError, match="only streams of one converted model"):
        eventful.Stream.cat([stream, other.stream()])
    with pytest.raises(ValueError, match="with and without drift control"):
        eventful.Stream.cat([stream, model.stream(drift=None)])
    small = model.stream()
    small(moving_squares(1, size=32, batch=1, seed=1)[0])
    with pytest.raises(ValueError, match="different input sizes"):
        eventful.Stream.cat([stream, small])


def test_a_snapshot_of_another_model_or_format_is_refused_and_changes_nothing():
    model = eventful.convert(tiny_vit(), policy=POLICY)
    other = eventful.convert(tiny_vit(seed=1), policy=POLICY)
    source = other.stream()
    source(camera(1)[0])
    snapshot = source.state_dict()
    assert snapshot["format"] == "eventful-stream/1"
    stream = model.stream()
    stream(camera(2)[0])
    before = stream.state_dict()
    with pytest.raises(ValueError, match="a model with fingerprint"):
        stream.load_state_dict(snapshot)
    with pytest.raises(ValueError, match="format 'eventful-stream/0'"):
        stream.load_state_dict({**before, "format": "eventful-stream/0"})
    after = stream.state_dict()
    assert after["steps"] == before["steps"]
    for old, new in zip(before["blocks"], after["blocks"], strict=True):
        assert all(torch.equal(old[name], new[name]) for name in old)


@pytest.mark.parametrize(
    ("convert_other", "match"),
    [
        (lambda vit: eventful.convert(vit, policy=POLICY, level="qk"), "levels 'exact' in every"),
        (
            lambda vit: eventful.convert(vit.to(torch.bfloat16), policy=POLICY),
            "weights in torch.float32; this stream's model has torch.bfloat16",
        ),
        (
            lambda vit: eventful.convert(vit, policy=POLICY, level="exact", cache_dtype=torch.half),
            "attention caches in None; this stream's model has torch.float16",
        ),
        (
            lambda vit: eventful.convert(vit, policy=eventful.Threshold(0.1)),
            "under a TopFraction policy, this stream's model has a Threshold one",
        ),
    ],
    ids=["level", "precision", "cache-precision", "policy-type"],
)
def test_a_snapshot_of_a_model_converted_otherwise_is_refused_and_changes_nothing(
    convert_other, match
):
    source = eventful.convert(tiny_vit(), policy=POLICY).stream()
    source(camera(1)[0])
    stream = convert_other(tiny_vit()).stream()
    frame = camera(2)[0].to(next(stream.model.parameters()).dtype)
    stream(frame)
    before = stream.state_dict()
    with pytest.raises(ValueError, match=match):
        stream.load_state_dict(source.state_dict())
    after = stream.state_dict()
    assert after["steps"] == before["steps"]
    for old, new in zip(before["blocks"], after["blocks"], strict=True):
        assert all(torch.equal(old[name], new[name]) for name in old)


def test_the_remembered_fingerprint_follows_the_weights():
    from eventful.core.fingerprint import cached_fingerprint, model_fingerprint

    vit = tiny_vit()
    first = cached_fingerprint(vit)
    assert first == model_fingerprint(vit) == cached_fingerprint(vit)
    with torch.no_grad():
        vit.blocks[0].mlp.fc1.bias.add_(1.0)  # changed in place
    assert cached_fingerprint(vit) == model_fingerprint(vit) != first
    vit.load_state_dict(tiny_vit(seed=1).state_dict())
    assert cached_fingerprint(vit) == model_fingerprint(tiny_vit(seed=1))


# TopK(2) without drift control: so few changes that the head's stages stay sparse to the last,
# and its final 1x1 convolution updates its output, kept among their caches (`local_head.FED`),
# where they moved. (Drift control refreshes one stream at a time, and a batch's head then runs
# densely for all its streams.)
@pytest.mark.parametrize(
    "policy, options",
    [(POLICY, {}), (eventful.TopK(2), {"drift": None})],
    ids=["fraction", "two tokens"],
)
def test_a_model_with_an_eventful_head_keeps_its_head_caches_through_take_and_cat(policy, options):
    from tests.test_local_head import saliency_model

    model = eventful.convert(saliency_model(), policy=policy, level="exact")
    cameras = [camera(seed) for seed in (1, 2)]
    alone = [model.stream(**options) for _ in cameras]
    for step in range(3):
        for stream, frames in zip(alone, cameras, strict=True):
            stream(frames[step])
    joined = eventful.Stream.cat(alone)
    assert set(joined.state.heads) == set(alone[0].state.heads) != set()
    for step in range(3, 6):
        together = joined(torch.cat([frames[step] for frames in cameras]))
        for index, (stream, frames) in enumerate(zip(alone, cameras, strict=True)):
            want = stream(frames[step]).saliency
            assert_equal_up_to_rounding(together.saliency[index : index + 1], want)
    fed = [name for name in joined.state.heads["decoder.stages"] if name.startswith("fed:")]
    assert fed == ["fed:decoder.final_conv"]
    back = joined.take([1])
    assert_equal_up_to_rounding(back(cameras[1][6]).saliency, alone[1](cameras[1][6]).saliency)
