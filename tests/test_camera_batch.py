"""One worker's cameras, batched: order per camera, equality with cameras run alone, the
back-pressure rule, resets on a new frame size, moving a camera, and bad input."""

import subprocess
import sys

import pytest
import torch

import eventful
from eventful.serve.camera_batch import CameraBatch
from eventful.synthetic import moving_squares
from tests.helpers import assert_equal_up_to_rounding, tiny_vit

POLICY = eventful.TopFraction(0.3)


def frames(seed: int, steps: int = 8, size: int = 64) -> torch.Tensor:
    """(steps, 3, size, size) frames of one camera."""
    return moving_squares(steps, size=size, batch=1, seed=seed)[:, 0]


def alone(model, video: torch.Tensor) -> list[torch.Tensor]:
    stream = model.stream()
    return [stream(frame[None]) for frame in video]


def test_cameras_at_different_rates_get_their_results_in_order_as_if_alone():
    model = eventful.convert(tiny_vit(), policy=POLICY)
    videos = {"a": frames(1), "b": frames(2), "c": frames(3)}
    served = CameraBatch(model)
    for camera in videos:
        served.add(camera)
    sent = {camera: 0 for camera in videos}
    results = {camera: [] for camera in videos}
    for tick in range(8):
        for camera, every in (("a", 1), ("b", 2), ("c", 1)):
            if tick % every == 0 and sent[camera] < 8:
                served.submit(camera, sent[camera], videos[camera][sent[camera]])
                sent[camera] += 1
        if tick == 5:
            continue  # a slow tick: frames wait
        for result in served.step():
            results[result.camera].append(result)
    while served.pending():
        for result in served.step():
            results[result.camera].append(result)
    for camera, video in videos.items():
        got = results[camera]
        assert [r.sequence for r in got] == list(range(sent[camera]))
        assert all(r.dropped == [] and r.reset is None for r in got)
        for result, want in zip(got, alone(model, video[: sent[camera]]), strict=True):
            assert_equal_up_to_rounding(result.output, want)
        assert got[0].ops == got[0].dense_ops and got[-1].ops < got[-1].dense_ops


def test_a_camera_too_fast_for_its_worker_drops_its_oldest_frames():
    served = CameraBatch(eventful.convert(tiny_vit(), policy=POLICY), max_pending=2)
    served.add("fast")
    video = frames(1)
    for sequence in range(5):
        served.submit("fast", sequence, video[sequence])
    assert served.pending() == 2  # never more than max_pending
    first, second = served.step()[0], served.step()[0]
    assert (first.sequence, first.dropped) == (3, [0, 1, 2])
    assert (second.sequence, second.dropped) == (4, [])


def test_a_new_frame_size_resets_the_camera_and_is_reported():
    vit = tiny_vit()
    served = CameraBatch(eventful.convert(vit, policy=POLICY))
    served.add("cam")
    small, large = frames(1, size=64), frames(2, size=96)
    served.submit("cam", 0, small[0])
    served.step()
    served.submit("cam", 1, large[0])
    result = served.step()[0]
    assert result.reset == "frame size changed from (3, 64, 64) to (3, 96, 96)"
    assert result.ops == result.dense_ops
    with torch.no_grad():
        assert_equal_up_to_rounding(result.output, vit(large[:1]))


def test_a_camera_moved_to_another_worker_continues_as_if_never_moved():
    model = eventful.convert(tiny_vit(), policy=POLICY)
    video = frames(1)
    first, second = CameraBatch(model), CameraBatch(model)
    first.add("cam")
    first.add("other")
    for sequence in range(4):
        first.submit("cam", sequence, video[sequence])
        first.submit("other", sequence, frames(2)[sequence])
        first.step()
    second.add("cam", snapshot=first.remove("cam"))
    moved = []
    for sequence in range(4, 8):
        second.submit("cam", sequence, video[sequence])
        moved += second.step()
    for result, want in zip(moved, alone(model, video)[4:], strict=True):
        assert_equal_up_to_rounding(result.output, want)


def test_bad_input_is_refused_and_other_cameras_are_unaffected():
    model = eventful.convert(tiny_vit(), policy=POLICY)
    served = CameraBatch(model)
    served.add("good")
    served.add("bad")
    video = frames(1)
    with pytest.raises(KeyError, match="unknown camera 'missing'"):
        served.submit("missing", 0, video[0])
    with pytest.raises(ValueError, match="already served here"):
        served.add("good")
    with pytest.raises(ValueError, match=r"expected a frame \(C, H, W\), got \(1, 3, 64, 64\)"):
        served.submit("bad", 0, video[:1])
    served.submit("bad", 5, video[0])
    with pytest.raises(ValueError, match="frame 3 arrived after frame 5"):
        served.submit("bad", 3, video[1])
    other = eventful.convert(tiny_vit(seed=1), policy=POLICY).stream()
    other(video[:1])
    with pytest.raises(ValueError, match="a model with fingerprint"):
        served.add("stranger", snapshot=other.state_dict())
    assert "stranger" not in served.cameras
    results = []
    for sequence in range(3):
        served.submit("good", sequence, video[sequence])
        results += [r for r in served.step() if r.camera == "good"]
    for result, want in zip(results, alone(model, video[:3]), strict=True):
        assert_equal_up_to_rounding(result.output, want)
    with pytest.raises(ValueError, match="max_pending must be a positive integer"):
        CameraBatch(model, max_pending=0)


def test_the_engine_and_the_camera_batch_never_import_ray():
    code = (
        "import sys, eventful, eventful.serve.camera_batch, eventful.cli; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_model_with_a_head_gets_its_own_output_type_per_camera():
    from eventful.models.saliency import SaliencyOutput
    from tests.test_local_head import saliency_model

    model = eventful.convert(saliency_model(), policy=POLICY)
    served = CameraBatch(model)
    videos = {"a": frames(1, 3), "b": frames(2, 3)}
    for camera in videos:
        served.add(camera)
    results = {camera: [] for camera in videos}
    for sequence in range(3):
        for camera, video in videos.items():
            served.submit(camera, sequence, video[sequence])
        for result in served.step():
            results[result.camera].append(result.output)
    for camera, video in videos.items():
        for got, want in zip(results[camera], alone(model, video), strict=True):
            assert isinstance(got, SaliencyOutput)
            assert_equal_up_to_rounding(got.saliency, want.saliency)
