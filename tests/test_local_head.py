"""Eventful heads: local convolution stacks recompute only what their changed inputs reach."""

import copy
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eventful
from eventful.core import kernels, local_head
from eventful.core.local_head import (
    HeadStep,
    LocalStack,
    channels_first,
    convolution_as_product,
    output_shape,
    sorted_distinct,
)
from eventful.models.saliency import SaliencyDecoder, SaliencyModel
from tests.helpers import assert_equal_up_to_rounding, kernel_calls, tiny_vit

# Every kind of layer geometry the scatter must place: transposed and plain, strides, paddings,
# dilations, odd kernels, output padding. 16 output channels: enough work per input element for
# a sparse update to pay even with a 1x1 kernel (`SPARSE_MIN_WORK`).
CONVOLUTIONS = {
    "transposed 4/2/1": lambda: nn.ConvTranspose2d(6, 16, 4, stride=2, padding=1),
    "transposed 3/2/1 +1": lambda: nn.ConvTranspose2d(
        6, 16, 3, stride=2, padding=1, output_padding=1
    ),
    "transposed dilated": lambda: nn.ConvTranspose2d(6, 16, 3, stride=1, padding=2, dilation=2),
    "plain 3/1/1": lambda: nn.Conv2d(6, 16, 3, padding=1),
    "plain 3/2/1": lambda: nn.Conv2d(6, 16, 3, stride=2, padding=1),
    "plain 1x1": lambda: nn.Conv2d(6, 16, 1),
    "plain 5x3 dilated": lambda: nn.Conv2d(6, 16, (5, 3), padding=(4, 1), dilation=(2, 1)),
}


needs_head_kernel = pytest.mark.skipif(
    kernels.head_stage() is None, reason="the CPU kernels could not be built here"
)


def stack_of(first: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    channels = first.out_channels
    batch_norm = nn.BatchNorm2d(channels)
    batch_norm.running_mean.uniform_(-0.5, 0.5)
    batch_norm.running_var.uniform_(0.5, 2.0)
    last = nn.ConvTranspose2d(channels, 3, 4, 2, 1)
    return nn.Sequential(first, batch_norm, nn.ReLU(), last).eval()


def run_steps(stack: LocalStack, inputs: list[torch.Tensor]) -> tuple[list, list[HeadStep]]:
    caches, outputs, steps = {}, [], []
    for index, frame in enumerate(inputs):
        step = HeadStep(caches, dense=index == 0)
        stack.step = step
        outputs.append(stack(frame))
        steps.append(step)
    stack.step = None
    return outputs, steps


def sparse_changes(size: int = 9, steps: int = 5, share: float = 0.15) -> list[torch.Tensor]:
    """Inputs (2, 6, size, size) that change at about `share` of their positions per step, per
    stream (a few by default)."""
    generator = torch.Generator().manual_seed(1)
    current = torch.randn(2, 6, size, size, generator=generator)
    inputs = [current.clone()]
    for _ in range(steps - 1):
        mask = torch.rand(2, 1, size, size, generator=generator) < share
        current = current + mask * torch.randn(current.shape, generator=generator)
        inputs.append(current.clone())
    return inputs


@pytest.mark.parametrize("name", CONVOLUTIONS)
def test_sparse_updates_equal_the_dense_stack_for_every_layer_geometry(name):
    layers = stack_of(CONVOLUTIONS[name]())
    stack = LocalStack("head", layers)
    inputs = sparse_changes()
    outputs, steps = run_steps(stack, inputs)
    with torch.no_grad():
        for got, frame in zip(outputs, inputs, strict=True):
            assert_equal_up_to_rounding(got, layers(frame))
    # The later steps ran incrementally, on fewer multiply-accumulates than the dense stack.
    assert all(step.macs < step.dense_macs for step in steps[1:])
    assert steps[0].macs == steps[0].dense_macs


def test_a_dense_step_computes_exactly_what_the_original_layers_compute():
    layers = stack_of(nn.ConvTranspose2d(6, 5, 4, stride=2, padding=1))
    inputs = sparse_changes()
    stack = LocalStack("head", layers)
    caches = {}
    for frame in inputs:
        stack.step = HeadStep(caches, dense=True)
        with torch.no_grad():
            assert torch.equal(stack(frame), layers(frame))


def test_a_change_everywhere_runs_the_layers_densely_on_the_new_input():
    layers = stack_of(nn.Conv2d(6, 16, 3, padding=1))
    first, second = torch.randn(1, 6, 8, 8), torch.randn(1, 6, 8, 8)
    outputs, steps = run_steps(LocalStack("head", layers), [first, second])
    with torch.no_grad():
        assert_equal_up_to_rounding(outputs[1], layers(second))
    # The dense layers, and comparing the input (a subtraction and a square per element).
    assert steps[1].macs == steps[1].dense_macs + 2 * 8 * 8 * 6


@pytest.mark.parametrize("bias", [True, False])
def test_a_one_by_one_convolution_with_nothing_to_save_runs_as_a_matrix_product(bias):
    """The saliency decoder's final 1x1 convolution to one channel: no caches; the original
    layer on dense steps (bit for bit), a matrix product on the others (up to rounding)."""
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Conv2d(6, 1, 1, bias=bias), nn.Sigmoid()).eval()
    inputs = sparse_changes()
    outputs, steps = run_steps(LocalStack("head", layers), inputs)
    with torch.no_grad():
        assert torch.equal(outputs[0], layers(inputs[0]))
        for got, frame in zip(outputs[1:], inputs[1:], strict=True):
            assert got.shape == (2, 1, 9, 9) and got.is_contiguous()
            assert_equal_up_to_rounding(got, layers(frame))
    assert all(step.macs == step.dense_macs for step in steps)


def test_convolution_as_product_leaves_other_convolutions_to_the_layer():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7)
    for conv in (nn.Conv2d(6, 4, 1, stride=2), nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 4, 1)):
        with torch.no_grad():
            assert_equal_up_to_rounding(convolution_as_product(conv, x), conv(x))


def test_head_ops_follow_the_hand_derived_formulas():
    # ConvTranspose2d(6 -> 5, 4x4, stride 2, padding 1) on 1 x 6 x 4 x 4, then a 1x1 Conv2d to
    # 3 channels (3 multiply-accumulates per input element: it always runs densely).
    layers = nn.Sequential(nn.ConvTranspose2d(6, 5, 4, 2, 1), nn.ReLU(), nn.Conv2d(5, 3, 1))
    first = torch.randn(1, 6, 4, 4)
    second = first.clone()
    second[0, :, 0, 0] += 1.0  # one position changes, in the corner
    _, steps = run_steps(LocalStack("head", layers.eval()), [first, second])
    transposed = 16 * 6 * (5 * 16) + 8 * 8 * 5  # input elements x (C_out x K), plus bias adds
    pointwise = 8 * 8 * 5 * 3 + 8 * 8 * 3
    assert steps[0].dense_macs == steps[0].macs == transposed + pointwise
    # The step: compare 16 x 6 inputs (a subtraction and a square each); one delta times the
    # kernel (6 x 16 x 5); its 3 x 3 outputs inside the 8 x 8 map are added and compared
    # (9 x 5 each); then the 1x1 convolution on the whole map.
    assert steps[1].macs == 2 * 16 * 6 + 6 * 16 * 5 + 2 * 9 * 5 + pointwise
    assert steps[1].dense_macs == steps[0].dense_macs


def test_output_shapes_follow_torch():
    for make in CONVOLUTIONS.values():
        conv = make()
        inputs = torch.randn(2, 6, 7, 9)
        assert output_shape(conv, tuple(inputs.shape)) == tuple(conv(inputs).shape)


def saliency_model(seed: int = 0) -> SaliencyModel:
    torch.manual_seed(seed)
    model = SaliencyModel(tiny_vit(seed), SaliencyDecoder(48, (16, 8))).eval()
    for module in model.decoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
    return model


def frames_with_a_moving_square(steps: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    background = torch.randn(1, 3, 64, 64, generator=generator)
    frames = []
    for step in range(steps):
        frame = background.clone()
        frame[..., 8:24, 4 + 4 * step : 20 + 4 * step] += 1.5
        frames.append(frame)
    return frames


@pytest.mark.parametrize("level", ["tokenwise", "exact"])
def test_with_every_token_selected_the_eventful_head_is_the_dense_decoder_on_its_tokens(level):
    model = saliency_model()
    converted = eventful.convert(model, policy=eventful.TopK(65), level=level)
    assert [stack.name for stack in converted.local_stacks()] == [
        "decoder.stages",
        "decoder.final_conv",
    ]
    stream = converted.stream(drift=None)
    with torch.no_grad():
        for frame in frames_with_a_moving_square():
            output = stream(frame)
            decoded = model.decoder(output.tokens[:, 1:], (8, 8), (64, 64))
            assert torch.equal(output.saliency, decoded)
            assert_equal_up_to_rounding(output.saliency, model(frame).saliency)


def test_few_tokens_run_the_head_on_fewer_ops_close_to_the_dense_decoder():
    model = saliency_model()
    stream = eventful.convert(model, policy=eventful.TopK(16)).stream(drift=None)
    differences, head_macs = [], []
    with torch.no_grad():
        for frame in frames_with_a_moving_square():
            output = stream(frame)
            decoded = model.decoder(output.tokens[:, 1:], (8, 8), (64, 64))
            differences.append((output.saliency - decoded).abs().mean().item())
            head_macs.append((stream.trace.head_macs, stream.trace.head_dense_macs))
    assert differences[0] == 0.0  # the first step is dense
    assert head_macs[0][0] == head_macs[0][1]
    assert all(0 < macs < dense for macs, dense in head_macs[1:])
    assert max(differences) < 0.02


def test_a_head_that_is_not_local_runs_densely_and_says_so_once():
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = tiny_vit()
            self.pool = nn.AdaptiveAvgPool1d(1)
            self.classifier = nn.Linear(48, 10)

        def forward(self, frames):
            tokens = self.backbone(frames)
            return self.classifier(self.pool(tokens.transpose(1, 2)).squeeze(-1))

    model = Classifier().eval()
    with pytest.warns(UserWarning, match=r"classifier \(Linear\).*run densely") as caught:
        converted = eventful.convert(model, policy=eventful.TopK(65))
    assert len(caught) == 1
    assert converted.dense_head_layers == ["classifier (Linear)"]
    stream = converted.stream(drift=None)
    frame = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, at conversion: no warning per step
        with torch.no_grad():
            output = stream(frame)
            stream(frame)
    assert_equal_up_to_rounding(output, model(frame))
    assert stream.ops.by_category["head"] == 48 * 10 + 10  # runs in full on every step


def test_a_head_with_a_norm_over_features_converts_and_runs_it_densely():
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = tiny_vit()
            self.norm = nn.LayerNorm(48)  # weights of its own, neither pointwise nor a layer
            self.tags = nn.Linear(48, 5)

        def forward(self, frames):
            return self.tags(self.norm(self.backbone(frames)))

    model = Tagger().eval()
    with pytest.warns(UserWarning, match="run densely"):
        converted = eventful.convert(model, policy=eventful.TopK(65))
    assert converted.dense_head_layers == ["norm (LayerNorm)", "tags (Linear)"]
    frame = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_equal_up_to_rounding(converted.stream(drift=None)(frame), model(frame))


def test_counting_off_changes_no_output():
    model = saliency_model()
    converted = eventful.convert(model, policy=eventful.TopK(16))
    counted, uncounted = converted.stream(drift=None), converted.stream(count_ops=False, drift=None)
    with torch.no_grad():
        for frame in frames_with_a_moving_square():
            first, second = counted(frame), uncounted(frame)
            assert torch.equal(first.saliency, second.saliency)
            assert torch.equal(first.tokens, second.tokens)
    assert uncounted.ops is None and uncounted.trace is None


def test_a_restored_snapshot_continues_the_head_bit_for_bit():
    model = saliency_model()
    converted = eventful.convert(model, policy=eventful.TopK(16))
    frames = frames_with_a_moving_square()
    stream = converted.stream(drift=None)
    with torch.no_grad():
        for frame in frames[:3]:
            stream(frame)
        snapshot = stream.state_dict()
        assert snapshot["heads"]  # the head's caches are part of the snapshot
        expected = [stream(frame).saliency for frame in frames[3:]]
        restored = converted.stream(drift=None)
        restored.load_state_dict(snapshot)
        got = [restored(frame).saliency for frame in frames[3:]]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_the_head_runs_only_inside_a_step():
    converted = eventful.convert(saliency_model(), policy=eventful.TopK(16))
    stack = converted.local_stacks()[0]
    with pytest.raises(RuntimeError, match="runs only inside a step"):
        stack(torch.randn(1, 48, 8, 8))


def test_a_gated_input_that_runs_a_stage_densely_keeps_what_it_left_out_for_later():
    # On the encoder's grid, the step passes on the 5 largest of 9 changes (a share of 0.6);
    # more than half of the first convolution's input positions then differ from before, so it
    # runs densely on its cached input, which holds those 5 changes only; the next step, with
    # every token selected, runs the original layers on the whole input.
    layers = stack_of(nn.Conv2d(6, 5, 3, padding=1))
    stack = LocalStack("head", layers)
    first = torch.randn(1, 6, 3, 3)
    second = first + torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # every position, by 1 to 9
    caches = {}
    stack.step = HeadStep(caches, dense=True, grid=lambda: (3, 3), shares=lambda: [0.6])
    stack(first)
    stack.step = HeadStep(caches, dense=False, grid=lambda: (3, 3), shares=lambda: [0.6])
    halfway = stack(second)
    assert halfway.is_contiguous()  # a stage run densely on its cached (channels-last) input
    passed = first.clone()
    passed.view(1, 6, 9)[..., 4:] = second.view(1, 6, 9)[..., 4:]  # the 5 largest changes
    with torch.no_grad():
        assert_equal_up_to_rounding(halfway, layers(passed))
        stack.step = HeadStep(caches, dense=False, grid=lambda: (3, 3), shares=lambda: [1.0])
        assert torch.equal(stack(second), layers(second))  # every token: the original layers


@pytest.mark.parametrize("count", [0, 1, 7, 3000])
def test_sorted_distinct_equals_unique(count):
    generator = torch.Generator().manual_seed(count)
    indices = torch.randint(0, 500, (count,), generator=generator)
    distinct = sorted_distinct(indices, 500)
    assert torch.equal(distinct, indices.unique())
    assert distinct.dtype == torch.int64


def test_channels_first_turns_a_channels_last_output_around():
    outputs = torch.randn(2, 5, 4, 3).contiguous(memory_format=torch.channels_last)
    turned = channels_first(outputs)
    assert turned.is_contiguous() and torch.equal(turned, outputs)
    already = torch.randn(2, 5, 4, 3)
    assert channels_first(already) is already


def stage_kernel_runs(monkeypatch, layers, inputs, kernel: bool, context) -> tuple[list, list]:
    """Outputs and op counts of a stack over the inputs, its sparse stages after their product
    in the CPU kernel (`kernels.head_stage`) or in PyTorch operators."""
    outputs, _, steps = stage_runs(monkeypatch, layers, inputs, kernel, context=context)
    return outputs, [step.macs for step in steps]


@needs_head_kernel
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("name", CONVOLUTIONS)
def test_the_stage_kernel_equals_the_python_stage_bit_for_bit(name, context, monkeypatch):
    with kernel_calls("head_stage") as calls:
        layers = stack_of(CONVOLUTIONS[name]())
        inputs = sparse_changes()
        want = stage_kernel_runs(monkeypatch, layers, inputs, False, context)
        assert len(calls) == 0
        got = stage_kernel_runs(monkeypatch, layers, inputs, True, context)
        assert len(calls) > 0
        assert all(torch.equal(a, b) for a, b in zip(got[0], want[0], strict=True))
        assert got[1] == want[1]  # the op counts: the same contributions and touched positions


@needs_head_kernel
@pytest.mark.parametrize(
    "name", ["transposed 4/2/1", "transposed dilated", "plain 3/1/1", "plain 5x3 dilated"]
)
def test_the_stage_kernel_equals_the_python_stage_where_threads_split_the_rows(name, monkeypatch):
    """Enough changes that the kernel's threads take spans of the touched rows (balanced by the
    contributions landing on them), on two threads whatever the machine has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kernel_calls("head_stage") as calls:
            layers = stack_of(CONVOLUTIONS[name]())
            inputs = sparse_changes(size=40, share=0.1)
            want = stage_kernel_runs(monkeypatch, layers, inputs, False, torch.inference_mode)
            got = stage_kernel_runs(monkeypatch, layers, inputs, True, torch.inference_mode)
            assert len(calls) > 0
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0], strict=True))
    assert got[1] == want[1]


def stage_runs(
    monkeypatch, layers, inputs, kernel: bool, dtype=None, context=torch.inference_mode
) -> tuple:
    """Outputs of a stack over the inputs under `context`, its convolutions in `dtype`
    (`compute_dtype`), its stages after their products in the CPU kernels or in PyTorch
    operators; the stack; and its steps (`HeadStep`: caches, op counts)."""
    monkeypatch.setattr(local_head, "STAGE_KERNEL", kernel)
    stack = LocalStack("head", layers, compute_dtype=dtype)
    with context():
        outputs, steps = run_steps(stack, inputs)
    return outputs, stack, steps


@needs_head_kernel
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_dense_stage_within_a_step_writes_its_cache_in_the_kernel_bit_for_bit(dtype, monkeypatch):
    layers = stack_of(CONVOLUTIONS["transposed 4/2/1"]())
    inputs = sparse_changes(share=0.5)  # above DENSE_SHARE: the first stage runs densely
    with kernel_calls("head_pointwise") as calls:
        want, _, _ = stage_runs(monkeypatch, layers, inputs, False, dtype)
        assert len(calls) == 0
        got, _, steps = stage_runs(monkeypatch, layers, inputs, True, dtype)
        assert len(calls) == len(inputs) - 1  # once a step after the first
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert all(cache.dtype == torch.float32 for cache in steps[-1].caches["head"].values())


needs_prepacked = pytest.mark.skipif(
    not local_head.prepacks(torch.zeros(1)), reason="PyTorch has no oneDNN packed convolutions"
)


def prepacked_runs(
    monkeypatch, layers, inputs, prepacked: bool, dtype=None, context=torch.inference_mode
) -> tuple:
    """`stage_runs` with the dense stages within a step on prepacked weights or PyTorch's."""
    monkeypatch.setattr(local_head, "PREPACKED_CONVOLUTIONS", prepacked)
    return stage_runs(monkeypatch, layers, inputs, True, dtype, context)


@needs_prepacked
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", CONVOLUTIONS)
def test_a_dense_stage_within_a_step_on_prepacked_weights_equals_the_convolution(
    name, dtype, context, monkeypatch
):
    layers = stack_of(CONVOLUTIONS[name]())
    for size in (9, 12):  # a new input size packs the weights again
        inputs = sparse_changes(size=size, share=0.5)
        want, _, _ = prepacked_runs(monkeypatch, layers, inputs, False, dtype, context)
        got, stack, _ = prepacked_runs(monkeypatch, layers, inputs, True, dtype, context)
        assert stack._prepacked  # the first stage ran densely within steps, on packed weights
        for a, b in zip(got, want, strict=True):
            assert_equal_up_to_rounding(a, b)


@needs_prepacked
def test_prepacked_weights_follow_the_weights_and_leave_copies_and_pickles_alone(monkeypatch):
    layers = stack_of(CONVOLUTIONS["transposed 4/2/1"]())
    inputs = sparse_changes(share=0.5)
    _, stack, _ = prepacked_runs(monkeypatch, layers, inputs, True)
    assert stack._prepacked
    # oneDNN's packed weights cannot be copied or pickled: copies and pickles pack them again.
    for copied in (copy.deepcopy(stack), pickle.loads(pickle.dumps(stack))):
        assert not copied._prepacked
        with torch.inference_mode():
            got, _ = run_steps(copied, inputs)
            want, _ = run_steps(stack, inputs)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # A stack pickled before some of its caches existed loads with them empty.
    old = LocalStack.__new__(LocalStack)
    state = stack.__getstate__()
    del state["_low_matrices"], state["_prepacked"]
    old.__setstate__(state)
    assert old._low_matrices == {} and old._prepacked == {}
    with torch.no_grad():
        layers[0].weight.mul_(2)  # in place: the packed weight follows
    doubled, _, _ = prepacked_runs(monkeypatch, layers, inputs, True)
    reference, _, _ = prepacked_runs(monkeypatch, layers, inputs, False)
    for a, b in zip(doubled, reference, strict=True):
        assert_equal_up_to_rounding(a, b)
    with torch.inference_mode():
        again, _ = run_steps(stack, inputs)  # the first stack, its packing made before
    for a, b in zip(again, reference, strict=True):
        assert_equal_up_to_rounding(a, b)


@needs_head_kernel
def test_at_bf16_sparse_stages_add_bfloat16_products_as_the_python_stage_does(monkeypatch):
    layers = stack_of(CONVOLUTIONS["transposed 4/2/1"]())
    inputs = sparse_changes(share=0.05)  # few enough for both stages to update sparsely
    with kernel_calls("head_stage") as calls:
        want, _, _ = stage_runs(monkeypatch, layers, inputs, False, torch.bfloat16)
        got, stack, _ = stage_runs(monkeypatch, layers, inputs, True, torch.bfloat16)
        assert len(calls) > 0
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert set(stack._low_matrices) == {0, 1}  # both stages' products in bfloat16
    in_float32, _, _ = stage_runs(monkeypatch, layers, inputs, True)
    for a, b in zip(got, in_float32, strict=True):  # bfloat16's rounding, no more
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_stage_runs_densely_from_a_smaller_share_where_it_multiplies_in_bfloat16(
    dtype, monkeypatch
):
    """Between `LOW_PRECISION_DENSE_SHARE` and `DENSE_SHARE` of changed input positions, a
    stack that multiplies in bfloat16 runs its first stage densely and a float32 one sparsely;
    both give the original layers' outputs (bfloat16's rounding for the one)."""
    share = (local_head.LOW_PRECISION_DENSE_SHARE + local_head.DENSE_SHARE) / 2
    layers = stack_of(CONVOLUTIONS["transposed 4/2/1"]())
    inputs = sparse_changes(size=16, steps=4, share=share)
    changed = (inputs[1] != inputs[0]).any(1).float().mean(dim=(1, 2))
    low, high = local_head.LOW_PRECISION_DENSE_SHARE, local_head.DENSE_SHARE
    assert all(low < fraction < high for fraction in changed.tolist())
    dense_stages = []
    original = LocalStack._dense_stage

    def spy(self, index, *args, **kwargs):
        if self.step is not None and not self.step.dense:
            dense_stages.append(index)
        return original(self, index, *args, **kwargs)

    monkeypatch.setattr(LocalStack, "_dense_stage", spy)
    outputs, _, _ = stage_runs(monkeypatch, layers, inputs, True, dtype)
    in_bfloat16 = dtype == torch.bfloat16
    # The first stage densely in every step after the first, or never.
    assert dense_stages.count(0) == (len(inputs) - 1 if in_bfloat16 else 0)
    with torch.no_grad():
        for got, frame in zip(outputs, inputs, strict=True):
            want = layers(frame)
            if in_bfloat16:
                assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
            else:
                assert_equal_up_to_rounding(got, want)


@needs_head_kernel
@pytest.mark.parametrize("shares", [None, [0.2, 0.5]], ids=["every change", "shares"])
def test_the_input_change_kernel_passes_on_what_the_operators_pass_on(shares, monkeypatch):
    """`kernels.head_input_change` against the PyTorch operators it replaces, bit for bit: the
    positions in the same order (which orders the sums after them), their deltas and the cached
    input, for two streams, with equal changes at several positions (ties) and a NaN."""
    generator = torch.Generator().manual_seed(3)
    before = torch.randn(2, 6, 5, 5, generator=generator)
    now = before.clone()
    now[0, :, 1, 1:4] += 1.0  # three positions with the same change
    now[0, :, 3, 3] += torch.randn(6, generator=generator)
    now[1, :, 0, :] += torch.randn(6, 5, generator=generator)
    now[1, 2, 4, 4] = float("nan")
    layers = stack_of(CONVOLUTIONS["transposed 4/2/1"]())
    results = []
    for kernel in (False, True):
        monkeypatch.setattr(local_head, "INPUT_KERNEL", kernel)
        stack = LocalStack("head", layers)
        stack.step = HeadStep({}, dense=False, grid=lambda: (5, 5), shares=lambda: shares)
        caches = {"input0": local_head.flat_copy(before)}
        with kernel_calls("head_input_change") as calls, torch.inference_mode():
            changed, difference = stack._input_change(now, caches, shares)
        assert len(calls) == (1 if kernel else 0)
        results.append((changed, difference, caches["input0"]))
    (want_changed, want_difference, want_cached), (changed, difference, cached) = results
    assert torch.equal(changed, want_changed)
    exactly = {"rtol": 0, "atol": 0, "equal_nan": True}
    torch.testing.assert_close(difference, want_difference, **exactly)
    torch.testing.assert_close(cached, want_cached, **exactly)
    # Every changed position (the NaN's too), or per stream those of its share that changed
    # (4 of 5 in the first; the 5 of 12 that changed in the second, a NaN not above 0).
    assert len(changed) == (10 if shares is None else 9)
    assert torch.isnan(difference).any() == (shares is None)


@needs_head_kernel
def test_the_kernels_batch_norm_operands_follow_the_norms_statistics(monkeypatch):
    layers = stack_of(CONVOLUTIONS["transposed 4/2/1"]())
    inputs = sparse_changes()
    _, stack, _ = stage_runs(monkeypatch, layers, inputs, True)
    assert stack._norms  # kept from step to step
    changes = [
        lambda: layers[1].running_var.mul_(3),  # in place
        lambda: layers[1].weight.add_(0.5),
        lambda: setattr(layers[1], "eps", 0.25),
        lambda: setattr(layers[1], "running_mean", layers[1].running_mean + 1),  # a new tensor
    ]
    for change in changes:
        with torch.no_grad():
            change()
        with torch.inference_mode():
            got, _ = run_steps(stack, inputs)
        want, _, _ = stage_runs(monkeypatch, layers, inputs, False)  # computed anew each stage
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_batch_norm_without_running_statistics_is_not_pointwise():
    def stack(norm: nn.BatchNorm2d) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(6, 16, 3, padding=1), norm, nn.ReLU()).eval()

    assert local_head.is_local_stack(stack(nn.BatchNorm2d(16)))
    # In eval mode too it normalises with its batch's statistics: each position depends on all.
    batch_statistics = stack(nn.BatchNorm2d(16, track_running_stats=False))
    assert not local_head.is_local_stack(batch_statistics)
    head = nn.Sequential(batch_statistics)
    stacks, dense = local_head.convert_heads(head, "encoder")
    assert stacks == ["0.0"] and dense == ["0.1 (BatchNorm2d)"]


@needs_head_kernel
def test_the_pointwise_kernel_computes_what_the_operators_compute_bit_for_bit():
    kernel = kernels.head_pointwise()
    generator = torch.Generator().manual_seed(4)
    for channels in (64, 37, 5):
        source = torch.randn(300, channels, generator=generator) * 4
        source[0, 0], source[1, 1], source[2, 2] = float("nan"), -0.0, float("inf")
        scale = torch.randn(channels, generator=generator) * 3
        shift = torch.randn(channels, generator=generator)
        for low in (False, True):
            given = source.bfloat16() if low else source
            values = given.float()
            cases = [
                ([scale, None], [shift, None], torch.addcmul(shift, values, scale).clamp_min(0)),
                ([None, scale], [None, shift], torch.addcmul(shift, values.clamp_min(0), scale)),
                ([None], [None], values.clamp_min(0)),
            ]
            for scales, shifts, want in cases:
                output = torch.full_like(source, 7.0)
                pre = torch.full_like(source, 7.0) if low else None
                kernel(given, pre, output, scales, shifts, local_head.addcmul_fuses())
                torch.testing.assert_close(output, want, rtol=0, atol=0, equal_nan=True)
                if low:
                    torch.testing.assert_close(pre, values, rtol=0, atol=0, equal_nan=True)


@needs_head_kernel
def test_without_avx2_the_kernels_round_a_batch_norm_as_addcmul_does_there():
    # PyTorch's kernels for CPUs without AVX2 round addcmul's product and sum apart; where the
    # CPU has AVX2 they fuse them. The kernels follow whichever PyTorch runs.
    script = (
        "import torch\n"
        "from eventful.core import kernels, local_head\n"
        "assert not local_head.addcmul_fuses()\n"
        "torch.manual_seed(0)\n"
        "source, scale, shift = torch.randn(300, 37) * 4, torch.randn(37) * 3, torch.randn(37)\n"
        "output = torch.empty_like(source)\n"
        "kernels.head_pointwise()(source, None, output, [scale], [shift], False)\n"
        "assert torch.equal(output, torch.addcmul(shift, source, scale))\n"
    )
    environment = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


@needs_head_kernel
def test_the_pointwise_kernel_refuses_what_it_cannot_take_and_writes_nothing():
    kernel = kernels.head_pointwise()
    source, pre, output = torch.randn(12, 5), torch.randn(12, 5), torch.randn(12, 5)
    before = pre.clone(), output.clone()
    scale, shift = torch.ones(5), torch.zeros(5)
    cases = {
        "same shape, got .*12, 5.*12, 4": (source, pre[:, :4].contiguous(), output),
        r"float32 or bfloat16 CPU rows \(P, C\), got Double": (source.double(), None, output),
        "output as contiguous float32 CPU rows": (source, None, output.t().contiguous().t()),
    }
    for refused, (given, widened, written) in cases.items():
        with pytest.raises(RuntimeError, match=refused):
            kernel(given, widened, written, [scale], [shift], True)
    with pytest.raises(RuntimeError, match="5 contiguous float32 scales and shifts, got 4"):
        kernel(source, pre, output, [scale[:4]], [shift[:4]], True)
    assert torch.equal(pre, before[0]) and torch.equal(output, before[1])


@needs_head_kernel
def test_the_stage_kernel_leaves_other_pointwise_layers_and_autograd_to_python(monkeypatch):
    with kernel_calls("head_stage") as calls:
        torch.manual_seed(3)
        gelu = nn.Sequential(
            nn.ConvTranspose2d(6, 16, 4, 2, 1), nn.GELU(), nn.Conv2d(16, 3, 1)
        ).eval()
        inputs = sparse_changes()
        want = stage_kernel_runs(monkeypatch, gelu, inputs, False, torch.no_grad)
        got = stage_kernel_runs(monkeypatch, gelu, inputs, True, torch.no_grad)
        assert all(torch.equal(a, b) for a, b in zip(got[0], want[0], strict=True))
        stage_kernel_runs(
            monkeypatch, stack_of(CONVOLUTIONS["plain 3/1/1"]()), inputs, True, torch.enable_grad
        )
        assert len(calls) == 0


def saliency_with_and_without(monkeypatch, switch: str, kernel: str, k: int) -> dict:
    """By the value of `local_head.<switch>` (False, then True), the saliency of the converted
    `saliency_model` (TopK(k)) over `frames_with_a_moving_square` under inference mode; each run
    checks that the CPU kernel `kernel` ran exactly when the switch was on."""
    model = saliency_model()
    frames = frames_with_a_moving_square()
    saliency = {}
    for on in (False, True):
        monkeypatch.setattr(local_head, switch, on)
        stream = eventful.convert(model, policy=eventful.TopK(k)).stream(drift=None)
        with kernel_calls(kernel) as calls, torch.inference_mode():
            saliency[on] = torch.stack([stream(frame).saliency for frame in frames])
        assert (len(calls) > 0) == on
    return saliency


@needs_head_kernel
def test_the_saliency_model_with_the_stage_kernel_equals_it_without(monkeypatch):
    saliency = saliency_with_and_without(monkeypatch, "STAGE_KERNEL", "head_stage", 6)
    assert torch.equal(saliency[True], saliency[False])


@needs_head_kernel
def test_the_stage_kernel_returns_only_the_rows_that_moved():
    """Where every touched row moved, the kernel returns the changes it wrote; where a ReLU
    keeps some rows at zero, only the others. Both as the stage computes them in Python."""
    kernel = kernels.head_stage()
    geometry = ((1, 1), (1, 1), (0, 0), (1, 1), (4, 4), (4, 4))  # a 1 x 1 convolution
    changed = torch.tensor([9, 2, 14, 5])
    contributions = torch.tensor([0.25, -0.5, 0.125]) * torch.arange(1.0, 5.0).unsqueeze(1)
    for stays in ([], [2, 14]):  # positions whose sums stay below zero
        pre = torch.full((16, 3), 10.0)
        pre[stays] = -10.0
        cached = torch.relu(pre)
        want_pre = pre.clone()
        want_pre[changed] += contributions
        touched = changed.sort().values
        difference = torch.relu(want_pre[touched]) - cached[touched]
        moved = difference.abs().amax(1).ne(0)
        positions, changes, counts = kernel(
            changed, contributions, pre, cached, [None], [None], True, False, *geometry
        )
        assert torch.equal(positions, touched[moved])
        assert torch.equal(changes, difference[moved])
        assert torch.equal(pre, want_pre) and torch.equal(cached, torch.relu(want_pre))
        assert counts.tolist() == [4, 4] and len(positions) == 4 - len(stays)


@needs_head_kernel
def test_the_stage_kernel_refuses_what_it_cannot_take_and_leaves_the_caches_alone():
    kernel = kernels.head_stage()
    pre, cached = torch.randn(2 * 16, 5), torch.randn(2 * 16, 5)
    before = pre.clone(), cached.clone()
    changed = torch.tensor([3, 20])
    contributions = torch.randn(2, 9 * 5)
    scale, shift = torch.ones(5), torch.zeros(5)
    geometry = ((3, 3), (1, 1), (1, 1), (1, 1), (4, 4), (4, 4))
    cases = {
        r"changed positions in \[0, 32\), got 32": (
            torch.tensor([3, 32]),
            contributions,
            [scale],
            [shift],
        ),
        r"contributions of shape \[2, 45\], got \[2, 40\]": (
            changed,
            torch.randn(2, 40),
            [scale],
            [shift],
        ),
        "a scale and a shift .* or neither": (changed, contributions, [scale], [None]),
        "5 contiguous float32 scales and shifts, got 4 and 4": (
            changed,
            contributions,
            [scale[:4]],
            [shift[:4]],
        ),
    }
    for refused, (positions, given, scales, shifts) in cases.items():
        with pytest.raises(RuntimeError, match=refused):
            kernel(positions, given, pre, cached, scales, shifts, True, False, *geometry)
        assert torch.equal(pre, before[0]) and torch.equal(cached, before[1]), refused


def stack_named(converted, name: str) -> LocalStack:
    return next(stack for stack in converted.local_stacks() if stack.name == name)


def saliency_with_and_without_handing_rows(monkeypatch, context) -> dict[bool, torch.Tensor]:
    model = saliency_model()
    frames = frames_with_a_moving_square()
    saliency = {}
    for hand in (False, True):
        monkeypatch.setattr(local_head, "HAND_ROWS", hand)
        converted = eventful.convert(model, policy=eventful.TopK(6))
        final = stack_named(converted, "decoder.final_conv")
        views = []  # the channel stride of the final convolution's input, per step
        final.register_forward_hook(
            lambda _m, inputs, _o, views=views: views.append(inputs[0].stride(1))
        )
        stream = converted.stream(drift=None)
        with context():
            saliency[hand] = torch.stack([stream(frame).saliency for frame in frames])
        assert stack_named(converted, "decoder.stages").hands_rows  # it fed the final conv
        assert not final.hands_rows
        # A channels-last view has a channel stride of 1; a contiguous copy has H * W.
        assert (1 in views) == hand
    return saliency


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_a_stack_that_hands_its_cached_rows_to_the_next_gives_the_same_saliency(
    monkeypatch, context
):
    saliency = saliency_with_and_without_handing_rows(monkeypatch, context)
    assert_equal_up_to_rounding(saliency[True], saliency[False])


def test_an_output_handed_out_as_the_cache_keeps_its_values_when_kept(monkeypatch):
    monkeypatch.setattr(local_head, "HAND_ROWS", True)
    converted = eventful.convert(saliency_model(), policy=eventful.TopK(6))
    kept, values = [], []

    def keep_input(module, inputs, output):  # a user's hook that keeps what the stack got
        kept.append(inputs[0])
        values.append(inputs[0].clone())

    stack_named(converted, "decoder.final_conv").register_forward_hook(keep_input)
    stream = converted.stream(drift=None)
    with torch.no_grad():
        for frame in frames_with_a_moving_square():
            stream(frame)
    # From the third step on, the stages handed out their cache itself (a channels-last view);
    # each step after copied the cache before writing into it, as the hook still held it.
    assert not kept[-1].is_contiguous() and kept[-1].is_contiguous(
        memory_format=torch.channels_last
    )
    for tensor, value in zip(kept, values, strict=True):
        assert torch.equal(tensor, value)


def test_copies_and_pickles_of_a_stack_learn_anew_where_its_output_goes():
    converted = eventful.convert(saliency_model(), policy=eventful.TopK(6))
    stream = converted.stream(drift=None)
    with torch.no_grad():
        for frame in frames_with_a_moving_square(3):
            stream(frame)
    assert stack_named(converted, "decoder.stages").hands_rows
    for copied in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert not stack_named(copied, "decoder.stages").hands_rows


class SkippingHead(nn.Module):
    """A ViT, a local stack, and a 1x1 convolution on the stack's output that the forward leaves
    out while `skip` is set (the stack's output averaged over channels instead)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.backbone = tiny_vit()
        self.stages = nn.Sequential(
            nn.ConvTranspose2d(48, 16, 2, stride=2), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.stages[1].running_var.uniform_(0.5, 2.0)
        self.final = nn.Conv2d(16, 2, 1)
        self.skip = False

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(frames)[:, 1:]
        features = tokens.transpose(1, 2).reshape(tokens.shape[0], 48, 8, 8)
        stages = self.stages(features)
        return stages.mean(1, keepdim=True) if self.skip else self.final(stages)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_a_one_by_one_convolution_fed_by_a_stack_recomputes_only_where_its_input_moved(
    monkeypatch, context
):
    """The saliency decoder's final 1x1 convolution, fed by its stages: where they ran sparsely,
    only the positions of their output that moved (`FED_UPDATES`); the same saliency up to
    float rounding as every position at every step, on fewer multiply-accumulates, and its
    kept output travels with snapshots."""
    model = saliency_model()
    frames = frames_with_a_moving_square()
    saliency, final_macs = {}, {}
    for fed in (False, True):
        monkeypatch.setattr(local_head, "FED_UPDATES", fed)
        # Two tokens a step: few enough that the stages stay sparse to the last.
        converted = eventful.convert(model, policy=eventful.TopK(2))
        final = stack_named(converted, "decoder.final_conv")
        macs = []  # per step, what the final convolution added to the head's count

        def before(stack, _inputs, macs=macs):
            macs.append(-stack.step.macs)

        def after(stack, _inputs, _output, macs=macs):
            macs[-1] += stack.step.macs

        final.register_forward_pre_hook(before)
        final.register_forward_hook(after)
        stream = converted.stream(drift=None)
        with context():
            saliency[fed] = torch.stack([stream(frame).saliency for frame in frames])
        final_macs[fed] = macs
        kept = [key for key in stream.state.heads["decoder.stages"] if key.startswith("fed:")]
        assert kept == (["fed:decoder.final_conv"] if fed else [])
    assert_equal_up_to_rounding(saliency[True], saliency[False])
    assert final_macs[True][0] == final_macs[False][0]  # the dense step
    assert all(
        0 < fed < every
        for fed, every in zip(final_macs[True][1:], final_macs[False][1:], strict=True)
    )


@needs_head_kernel
def test_the_rows_product_kernel_recomputes_as_the_operators_do(monkeypatch):
    """The fed 1x1 convolution in one kernel call (`kernels.head_rows_product`) against the
    PyTorch operators it replaces: the same saliency up to float rounding; and a position's value
    depends neither on the positions recomputed beside it nor on the threads."""
    saliency = saliency_with_and_without(monkeypatch, "ROWS_PRODUCT_KERNEL", "head_rows_product", 2)
    assert_equal_up_to_rounding(saliency[True], saliency[False])

    product = kernels.head_rows_product()
    generator = torch.Generator().manual_seed(5)
    rows = torch.randn(300, 67, generator=generator)  # channels not a multiple of a vector
    weight, bias = torch.randn(3, 67, generator=generator), torch.randn(3, generator=generator)
    every = torch.arange(300)
    some = torch.tensor([299, 7, 150, 8])
    threads = torch.get_num_threads()
    kept = {}
    try:
        for name, moved, count in (("every", every, 2), ("some", some, 2), ("one", every, 1)):
            torch.set_num_threads(count)
            kept[name] = torch.zeros(300, 3)
            product(rows, moved, weight, bias, kept[name])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(kept["some"][some], kept["every"][some])
    assert kept["some"].count_nonzero() == 4 * 3  # nothing written elsewhere
    assert torch.equal(kept["one"], kept["every"])
    assert_equal_up_to_rounding(kept["every"], rows @ weight.t() + bias)


@pytest.mark.parametrize("skipped", [1, 3])
def test_a_one_by_one_convolution_left_out_of_a_step_recomputes_every_position_after(
    monkeypatch, skipped
):
    """A step that runs the feeding stack without the 1x1 convolution drops what the convolution
    kept: after it, the stack's output moved where the convolution's kept output no longer
    tells, so the convolution recomputes every position once."""
    # A still background; a square appears at the step left out, another one step after it,
    # elsewhere: after that step the output differs from the convolution's kept one around the
    # first square too, where the stack's output did not move in it.
    background = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    frames = []
    for index in range(6):
        frame = background.clone()
        if index >= skipped:
            frame[..., 8:24, 8:24] += 1.5
        if index >= skipped + 1:
            frame[..., 40:56, 40:56] -= 1.5
        frames.append(frame)
    outputs = {}
    for fed in (False, True):
        monkeypatch.setattr(local_head, "FED_UPDATES", fed)
        converted = eventful.convert(SkippingHead().eval(), policy=eventful.TopK(12))
        stream = converted.stream(drift=None)
        got = []
        with torch.no_grad():
            for index, frame in enumerate(frames):
                converted.model.skip = index == skipped
                got.append(stream(frame))
        outputs[fed] = torch.stack([output for index, output in enumerate(got) if index != skipped])
    assert_equal_up_to_rounding(outputs[True], outputs[False])
