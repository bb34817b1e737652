"""One test every model passes: every registered model (`eventful.models.create`) and every
supported Hugging Face class, through the same checks.

- every token selected (TopK(N)) returns what the dense model returns, at every level;
- threshold 0 returns it too;
- a batch of two streams equals the two streams run separately, up to rounding;
- a saved and restored stream continues bit-identically;
- converted and streamed under `torch.no_grad()` or `torch.inference_mode()`, or converted in
  one mode and stepped in others, it returns what it returns in default mode, at its own size
  and at another (an interpolated position embedding).
"""

import io

import pytest
import torch
from torch import Tensor

import eventful
from eventful.models.registry import MODEL_NAMES, create
from eventful.synthetic import moving_squares
from tests.helpers import (
    LEVELS,
    SelectionRecorder,
    SelectionReplay,
    assert_equal_up_to_rounding,
)
from tests.test_hf import BUILDERS as HF_BUILDERS
from tests.test_hf import randomized
from tests.test_hf_vitdet import vitdet as hf_vitdet

transformers = pytest.importorskip("transformers")
# The classification heads of the HF classes are linear layers: dense on every step, as said.
pytestmark = pytest.mark.filterwarnings("ignore:eventful.convert. the head layers")

TOLERANCE = 1e-4
# Registered models at the smallest size that exercises them (a windowed model: one window).
REGISTERED_SIZES = {
    "vit-s16": 64,
    "vit-b16": 64,
    "dinov2-saliency": 224,
    "dinov2-s14-vitdet": 196,
    "vitdet-b": 224,
    "vitdet-l": 224,
}
HF_MODELS = {
    **{name: (build, 32) for name, build in HF_BUILDERS.items()},
    "VitDetBackbone": (lambda: hf_vitdet("VitDetBackbone", out_features=["stage1", "stage3"]), 64),
    "VitDetModel": (lambda: hf_vitdet("VitDetModel"), 64),
}


def subject(name: str) -> tuple[torch.nn.Module, int]:
    """The dense model and its input size."""
    if name in REGISTERED_SIZES:
        return create(name, REGISTERED_SIZES[name]), REGISTERED_SIZES[name]
    build, size = HF_MODELS[name]
    torch.manual_seed(0)
    return randomized(build()).eval(), size


def tensors_of(output) -> list[Tensor]:
    """Every tensor a model output holds, in a fixed order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in tensors_of(item)]
    if hasattr(output, "keys"):  # transformers ModelOutput
        return [tensor for key in output.keys() for tensor in tensors_of(output[key])]
    return [getattr(output, name) for name in output._fields]  # SaliencyOutput


def token_count(dense: torch.nn.Module, size: int) -> int:
    """Tokens per stream at `size`."""
    probe = eventful.convert(dense, policy=eventful.TopK(1), level="tokenwise")
    return probe.encoder.embedding.num_tokens(size, size)


ALL_MODELS = [*MODEL_NAMES, *HF_MODELS]

# Another input size per model: another patch grid (a windowed model: still whole windows).
OTHER_SIZES = {
    "vit-s16": 80,
    "vit-b16": 80,
    "dinov2-saliency": 252,
    "dinov2-s14-vitdet": 238,
    "vitdet-b": 256,
    "vitdet-l": 256,
    "VitDetBackbone": 96,
    "VitDetModel": 96,
}
GRAD_MODES = {
    "default": torch.enable_grad,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


@pytest.fixture(scope="module", params=ALL_MODELS)
def model(request):
    dense, size = subject(request.param)
    frames = moving_squares(3, size=size, batch=2, seed=5)
    with torch.no_grad():
        expected = [tensors_of(dense(frame)) for frame in frames]
    other = OTHER_SIZES.get(request.param, 48)
    return dense, size, frames, expected, LEVELS, token_count(dense, size), other


def test_every_token_and_threshold_zero_return_the_dense_output(model):
    dense, _, frames, expected, levels, tokens, _ = model
    for level in levels:
        for policy in (eventful.TopK(tokens), eventful.Threshold(0.0)):
            stream = eventful.convert(dense, policy=policy, level=level).stream(batch_size=2)
            for frame, want in zip(frames, expected, strict=True):
                got = tensors_of(stream(frame))
                assert len(got) == len(want)
                for got_tensor, want_tensor in zip(got, want, strict=True):
                    torch.testing.assert_close(
                        got_tensor, want_tensor, rtol=TOLERANCE, atol=TOLERANCE
                    )


def test_a_batch_equals_its_streams_run_separately(model):
    dense, _, frames, _, levels, tokens, _ = model
    for level in levels:
        # The single streams replay the batch's selections: rounding differs between the
        # batch's matmuls and a single stream's, and near a tie it would swap a token.
        recorder = SelectionRecorder(eventful.TopK(max(1, tokens // 4)))
        batched = eventful.convert(dense, policy=recorder, level=level).stream(
            batch_size=2, drift=None
        )
        together = [tensors_of(batched(frame)) for frame in frames]
        for index in range(2):
            replay = SelectionReplay(recorder, index)
            single = eventful.convert(dense, policy=replay, level=level).stream(drift=None)
            for frame, outputs in zip(frames, together, strict=True):
                alone = tensors_of(single(frame[index : index + 1]))
                for got, want in zip(outputs, alone, strict=True):
                    assert_equal_up_to_rounding(got[index : index + 1], want)
            assert replay.calls == len(replay.recorded) > 0


def test_a_restored_stream_continues_bit_identically(model):
    dense, _, frames, _, levels, tokens, _ = model
    converted = eventful.convert(dense, policy=eventful.TopK(max(1, tokens // 4)), level=levels[-1])
    original = converted.stream(batch_size=2)
    for frame in frames[:2]:
        original(frame)
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)
    saved.seek(0)
    restored = converted.stream(batch_size=2)
    restored.load_state_dict(torch.load(saved))
    for frame in frames[2:]:
        for got, want in zip(tensors_of(restored(frame)), tensors_of(original(frame)), strict=True):
            assert torch.equal(got, want)


def streamed(dense, size: int, convert_mode: str, step_modes: list[str]) -> list[list[Tensor]]:
    """Outputs of a model converted under `convert_mode`, stepped under `step_modes` in turn."""
    frames = moving_squares(len(step_modes), size=size, batch=1, seed=7)
    with GRAD_MODES[convert_mode]():
        converted = eventful.convert(dense, policy=eventful.TopFraction(0.25))
    stream = converted.stream()
    outputs = []
    for frame, mode in zip(frames, step_modes, strict=True):
        with GRAD_MODES[mode]():
            outputs.append([tensor.clone() for tensor in tensors_of(stream(frame))])
    return outputs


def test_every_grad_mode_returns_what_default_mode_returns(model):
    dense, size, *_, other = model
    for input_size in (size, other):
        want = streamed(dense, input_size, "default", ["default"] * 3)
        runs = {mode: (mode, [mode] * 3) for mode in GRAD_MODES}
        runs["switching"] = ("inference_mode", ["inference_mode", "no_grad", "default"])
        for name, (convert_mode, step_modes) in runs.items():
            got = streamed(dense, input_size, convert_mode, step_modes)
            for got_step, want_step in zip(got, want, strict=True):
                for got_tensor, want_tensor in zip(got_step, want_step, strict=True):
                    assert torch.equal(got_tensor, want_tensor), (name, input_size)
