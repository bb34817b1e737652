"""Bad input is rejected with a clear error before any stream's cached state is touched."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import eventful

LEVELS = ("tokenwise", "qk", "full", "exact")
BATCH = 2
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_model(level="full"):
    torch.manual_seed(0)
    vit = eventful.ViT(image_size=32, patch_size=8, dim=32, depth=2, heads=4).eval()
    return eventful.convert(vit, policy=eventful.TopK(5), level=level).eval()


def frames(step, batch=BATCH, size=32):
    generator = torch.Generator().manual_seed(100 + step)
    return torch.rand(batch, 3, size, size, generator=generator)


def warm_streams(model, batch=BATCH):
    """A stream and its twin, both run for 2 valid steps, and a snapshot of the stream."""
    stream, twin = (
        model.stream(batch_size=batch, drift=None),
        model.stream(batch_size=batch, drift=None),
    )
    for step in range(2):
        stream(frames(step, batch))
        twin(frames(step, batch))
    return stream, twin, stream.state_dict()


def assert_untouched(stream, twin, snapshot):
    """The state equals `snapshot`, and the next valid step matches the twin bit for bit."""
    state = stream.state_dict()
    assert state["batch_size"] == snapshot["batch_size"]
    assert state["fresh"] == snapshot["fresh"]
    assert state["input_size"] == snapshot["input_size"]
    assert len(state["blocks"]) == len(snapshot["blocks"])
    for got, want in zip(state["blocks"], snapshot["blocks"], strict=True):
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), name
    step = frames(2, stream.batch_size)
    assert torch.equal(stream(step), twin(step))


def with_value(value):
    bad = frames(9)
    bad[1, 2, 5, 7] = value
    return bad


BAD_FRAMES = [
    pytest.param(
        lambda: [[0.0]], TypeError, "expected frames as a torch.Tensor, got list", id="not-tensor"
    ),
    pytest.param(
        lambda: frames(9)[0],
        ValueError,
        r"expected frames of shape \(B, 3, H, W\), got \(3, 32, 32\)",
        id="rank-3",
    ),
    pytest.param(
        lambda: torch.rand(BATCH, 1, 32, 32),
        ValueError,
        r"expected frames of shape \(B, 3, H, W\), got \(2, 1, 32, 32\)",
        id="one-channel",
    ),
    pytest.param(
        lambda: torch.rand(BATCH, 3, 4, 32),
        ValueError,
        r"at least 8x8 pixels \(one patch\), got 4x32",
        id="smaller-than-a-patch",
    ),
    pytest.param(
        lambda: frames(9, size=40),
        ValueError,
        "frames of 40x40 pixels differ from the 32x32 this stream state was built for",
        id="other-size",
    ),
    pytest.param(lambda: with_value(math.nan), ValueError, "NaN or Inf values", id="nan"),
    pytest.param(lambda: with_value(-math.inf), ValueError, "NaN or Inf values", id="inf"),
    pytest.param(
        lambda: frames(9, batch=3),
        ValueError,
        "frames hold a batch of 3, but the stream state holds 2 streams",
        id="batch-3-for-2",
    ),
    pytest.param(
        lambda: frames(9).double(),
        ValueError,
        "frames have dtype torch.float64, but the model has dtype torch.float32",
        id="float64",
    ),
    pytest.param(
        lambda: frames(9).half(),
        ValueError,
        "frames have dtype torch.float16, but the model has dtype torch.float32",
        id="float16",
    ),
    pytest.param(
        lambda: (frames(9) * 255).to(torch.uint8),
        ValueError,
        r"frames have dtype torch.uint8, but the model has dtype torch.float32; .*preprocessing",
        id="uint8",
    ),
    pytest.param(
        lambda: frames(9).to("meta"),
        ValueError,
        "frames are on meta, but the model is on cpu",
        id="meta-frames-cpu-model",
    ),
    pytest.param(
        lambda: frames(9).cuda(),
        ValueError,
        "frames are on cuda:0, but the model is on cpu",
        id="cuda-frames-cpu-model",
        marks=needs_cuda,
    ),
]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(("make_bad", "error", "match"), BAD_FRAMES)
def test_bad_frames_are_rejected_and_state_untouched(level, make_bad, error, match):
    stream, twin, snapshot = warm_streams(make_model(level))
    with pytest.raises(error, match=match):
        stream(make_bad())
    assert_untouched(stream, twin, snapshot)


@pytest.mark.parametrize(
    ("make_bad", "error", "match"), [p for p in BAD_FRAMES if p.id != "other-size"]
)
def test_bad_first_frames_leave_a_new_stream_unallocated(make_bad, error, match):
    stream = make_model().stream(batch_size=BATCH, drift=None)
    with pytest.raises(error, match=match):
        stream(make_bad())
    snapshot = stream.state_dict()
    assert snapshot.pop("format") == "eventful-stream/1" and snapshot.pop("fingerprint")
    assert snapshot.pop("configuration")["levels"] == ["full", "full"]
    assert snapshot == {
        "batch_size": BATCH,
        "fresh": [True, True],
        "input_size": None,
        "blocks": [],
        "heads": {},
        "steps": 0,
        "drift": None,
    }


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda f: f.transpose(2, 3).contiguous().transpose(2, 3), id="transposed"),
        pytest.param(lambda f: torch.stack([f, f], dim=-1)[..., 0], id="strided"),
        pytest.param(lambda f: f.to(memory_format=torch.channels_last), id="channels-last"),
    ],
)
def test_frames_in_any_memory_layout_give_the_contiguous_frames_outputs(layout):
    model = make_model()
    stream, twin = model.stream(batch_size=BATCH), model.stream(batch_size=BATCH)
    for step in range(3):
        contiguous = frames(step)
        laid_out = layout(contiguous)
        assert torch.equal(laid_out, contiguous) and not laid_out.is_contiguous()
        # The patch convolution may pick another kernel for another layout: within rounding.
        torch.testing.assert_close(stream(laid_out), twin(contiguous), atol=1e-5, rtol=1e-5)


def test_state_dtype_mismatch_is_rejected_and_state_untouched():
    model = make_model()
    stream, twin, snapshot = warm_streams(model)
    model.double()
    with pytest.raises(
        ValueError, match=r"state has dtype torch\.float32, frames have dtype torch\.float64"
    ):
        stream(frames(9).double())
    model.float()  # float32 -> float64 -> float32 is exact
    assert_untouched(stream, twin, snapshot)


@needs_cuda
def test_state_on_another_device_is_rejected_and_state_untouched():
    model = make_model()
    stream, twin, snapshot = warm_streams(model)
    model.cuda()
    with pytest.raises(ValueError, match=r"state is on cpu, but frames are on cuda:0.*state\.to"):
        stream(frames(9).cuda())
    model.cpu()
    assert_untouched(stream, twin, snapshot)


@pytest.mark.parametrize("level", LEVELS)
def test_new_frame_size_is_accepted_only_after_resetting_every_stream(level):
    model = make_model(level)
    stream, twin, _ = warm_streams(model)
    stream.reset([0])
    snapshot = stream.state_dict()
    with pytest.raises(ValueError, match=r"40x40 pixels differ from the 32x32.*stream\.reset\(\)"):
        stream(frames(9, size=40))
    twin.reset([0])
    assert_untouched(stream, twin, snapshot)

    stream.reset()
    output = stream(frames(9, size=40))
    assert output.shape == (BATCH, 1 + 25, 32)
    assert stream.state_dict()["input_size"] == (40, 40)
    assert torch.equal(output, model.stream(batch_size=BATCH)(frames(9, size=40)))


def test_unchecked_stream_runs_on_finite_frames():
    model = make_model()
    unchecked = model.stream(batch_size=1, check_finite=False)
    checked = model.stream(batch_size=1)
    assert unchecked.check_finite is False
    for step in range(3):
        assert torch.equal(unchecked(frames(step, batch=1)), checked(frames(step, batch=1)))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(
    ("policy", "match"),
    [
        (eventful.TopK(18), r"TopK\(k=18\) exceeds the 17 tokens.*k <= 17"),
        (eventful.TopK(1000), r"TopK\(k=1000\) exceeds the 17 tokens.*k <= 17"),
        (eventful.Threshold(0.5, min_tokens=18), r"min_tokens=18\) exceeds the 17 tokens.* <= 17"),
    ],
)
def test_more_tokens_than_the_input_has_are_rejected_and_state_untouched(level, policy, match):
    model = make_model(level)
    stream, twin, snapshot = warm_streams(model)
    model.policy = policy
    with pytest.raises(ValueError, match=match):
        stream(frames(2))
    model.policy = eventful.TopK(5)
    assert_untouched(stream, twin, snapshot)


@pytest.mark.parametrize(
    ("make_policy", "match"),
    [
        (lambda: eventful.TopK(0), "positive integer k, got 0"),
        (lambda: eventful.TopK(-3), "positive integer k, got -3"),
        (lambda: eventful.TopK(2.5), "positive integer k, got 2.5"),
        (lambda: eventful.TopK(True), "positive integer k, got True"),
        (lambda: eventful.TopFraction(0), r"fraction in \(0, 1\], got 0"),
        (lambda: eventful.TopFraction(1.5), r"fraction in \(0, 1\], got 1.5"),
        (lambda: eventful.TopFraction(True), r"fraction in \(0, 1\], got True"),
        (lambda: eventful.Threshold(True), "threshold >= 0, got True"),
        (lambda: eventful.Threshold(-1), "threshold >= 0, got -1"),
        (lambda: eventful.Threshold(math.nan), "threshold >= 0, got nan"),
        (lambda: eventful.TopK(4, norm=3), "norm must be one of 1, 2 or math.inf, got 3"),
    ],
)
def test_invalid_policy_arguments_are_rejected(make_policy, match):
    with pytest.raises(ValueError, match=match):
        make_policy()


def test_assigning_a_non_policy_is_rejected_and_keeps_the_old_policy():
    model = make_model()
    policy = model.policy
    with pytest.raises(TypeError, match=r"policy must be an eventful policy .*got 5"):
        model.policy = 5
    assert model.policy is policy
    vit = eventful.ViT(image_size=32, patch_size=8, dim=32, depth=2, heads=4)
    with pytest.raises(TypeError, match="got 'top5'"):
        eventful.convert(vit, policy="top5")


@pytest.mark.parametrize(
    ("level", "match"),
    [
        ("dense", r"level must be one of \('tokenwise', 'qk', 'full', 'exact'\), got 'dense'"),
        (["full", "dense"], "level must be one of .*got 'dense'"),
        (["full"] * 3, r"expected one level or 2 levels \(one per block\), got 3"),
        (["qk"], r"expected one level or 2 levels \(one per block\), got 1"),
    ],
)
def test_invalid_levels_are_rejected(level, match):
    vit = eventful.ViT(image_size=32, patch_size=8, dim=32, depth=2, heads=4)
    with pytest.raises(ValueError, match=match):
        eventful.convert(vit, policy=eventful.TopK(5), level=level)


@pytest.mark.parametrize(
    ("streams", "error", "match"),
    [
        ([5], IndexError, "stream index 5 out of range for a batch of 2 streams"),
        ([-1], IndexError, "stream index -1 out of range for a batch of 2 streams"),
        ([0, 5], IndexError, "stream index 5 out of range"),
        (["a"], TypeError, "stream indices must be integers, got 'a'"),
        ([0, True], TypeError, "stream indices must be integers, got True"),
    ],
)
def test_invalid_reset_indices_are_rejected_and_state_untouched(streams, error, match):
    stream, twin, snapshot = warm_streams(make_model())
    with pytest.raises(error, match=match):
        stream.reset(streams)
    assert_untouched(stream, twin, snapshot)


def test_reset_accepts_numpy_and_torch_integer_indices():
    stream, _, _ = warm_streams(make_model())
    stream.reset([np.int64(1), torch.tensor(0)])
    assert stream.state.fresh == [True, True]


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_invalid_batch_size_is_rejected(batch_size):
    with pytest.raises(ValueError, match=f"positive integer, got {batch_size!r}"):
        make_model().stream(batch_size=batch_size)


def test_converting_an_unsupported_model_names_the_supported_ones():
    with pytest.raises(
        TypeError, match=r"cannot convert a Linear; supported models: eventful\.ViT"
    ):
        eventful.convert(nn.Linear(3, 3), policy=eventful.TopK(5))


# --- budgets, token bounds, schedules and drift control -------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: eventful.OpsBudget(0), "positive, finite budget in GMACs per frame, got 0$"),
        (lambda: eventful.OpsBudget(-1.5), "OpsBudget expects a positive.*got -1.5"),
        (lambda: eventful.OpsBudget(math.nan), "OpsBudget expects a positive.*got nan"),
        (lambda: eventful.OpsBudget(math.inf), "OpsBudget expects a positive.*got inf"),
        (lambda: eventful.OpsBudget(True), "OpsBudget expects a positive.*got True"),
        (lambda: eventful.OpsBudget("1"), "OpsBudget expects a positive.*got '1'"),
        (lambda: eventful.OpsBudget(1.0, horizon=0), "positive integer horizon, got 0"),
        (lambda: eventful.LatencyBudget(0), "budget in milliseconds per frame, got 0$"),
        (lambda: eventful.LatencyBudget(-5), "LatencyBudget expects a positive.*got -5"),
        (lambda: eventful.LatencyBudget(math.nan), "LatencyBudget expects a positive.*got nan"),
        (lambda: eventful.LatencyBudget(False), "LatencyBudget expects a positive.*got False"),
        (lambda: eventful.LatencyBudget(5.0, window=1), "integer window >= 2, got 1"),
        (lambda: eventful.LatencyBudget(5.0, tolerance=0), "tolerance > 0, got 0"),
        (lambda: eventful.Threshold(0.5, min_tokens=0), "min_tokens must be a positive.*got 0"),
        (lambda: eventful.Threshold(0.5, min_tokens=-2), "min_tokens must be.*got -2"),
        (lambda: eventful.Threshold(0.5, min_tokens=True), "min_tokens must be.*got True"),
        (lambda: eventful.Threshold(0.5, max_tokens=2.5), "max_tokens must be.*got 2.5"),
        (
            lambda: eventful.Threshold(0.5, min_tokens=8, max_tokens=4),
            r"min_tokens \(8\) exceeds max_tokens \(4\)",
        ),
        (lambda: eventful.DriftControl(refresh_every=0), "refresh_every must be a positive.*got 0"),
        (lambda: eventful.DriftControl(refresh_every=-3), "refresh_every must be.*got -3"),
        (lambda: eventful.DriftControl(refresh_every=True), "refresh_every must be.*got True"),
        (lambda: eventful.DriftControl(refresh_every=2.5), "refresh_every must be.*got 2.5"),
        (lambda: eventful.DriftControl(error_bound=-1), "error_bound must be >= 0.*got -1"),
        (lambda: eventful.DriftControl(error_bound=math.nan), "error_bound must be.*got nan"),
        (lambda: eventful.DriftControl(error_bound=True), "error_bound must be.*got True"),
        (lambda: eventful.DriftControl(scene_cut_factor=1), "scene_cut_factor must be > 1.*got 1"),
        (lambda: eventful.DriftControl(scene_cut_factor=0.5), "scene_cut_factor.*got 0.5"),
        (lambda: eventful.DriftControl(scene_cut_factor=math.inf), "scene_cut_factor.*got inf"),
        (lambda: eventful.DriftControl(scene_cut_factor=True), "scene_cut_factor.*got True"),
    ],
)
def test_invalid_budget_bound_and_drift_arguments_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def ops_range(model, num_tokens=17):
    """GMACs per frame of k = 1 and of the dense model, as the budget messages print them."""
    from eventful.core.ops import dense_macs, steady_topk_macs

    blocks = model.encoder.blocks
    one, dense = steady_topk_macs(blocks, num_tokens, 1), dense_macs(blocks, num_tokens)
    return f"{one / 1e9:.6g}", f"{dense / 1e9:.6g}"


@pytest.mark.parametrize("too", ["low", "high"])
def test_ops_budget_out_of_reach_is_rejected_at_the_step_and_state_untouched(too):
    model = make_model()
    stream, twin, snapshot = warm_streams(model)
    one, dense = ops_range(model)
    expected = f"expected a budget from {one} to {dense} GMACs per frame"
    if too == "low":
        gops = float(one) / 2
        match = rf"OpsBudget\({gops}\) is below the {one} GMACs .*\(k=1\) .* at 17 tokens"
    else:
        gops = float(dense) * 2
        match = rf"OpsBudget\({gops}\) exceeds the {dense} GMACs per frame of the dense model"
    model.policy = eventful.OpsBudget(gops)
    with pytest.raises(ValueError, match=match) as error:
        stream(frames(2))
    assert expected in str(error.value)
    model.policy = eventful.TopK(5)
    assert_untouched(stream, twin, snapshot)


def test_ops_budget_change_out_of_reach_is_rejected_and_keeps_the_old_budget():
    model = make_model()
    _, dense = ops_range(model)
    policy = model.policy = eventful.OpsBudget(float(dense) / 3)
    stream, _, snapshot = warm_streams(model)
    k = policy.k
    with pytest.raises(ValueError, match=r"exceeds the .* GMACs per frame of the dense model"):
        policy.budget = float(dense) * 2
    with pytest.raises(ValueError, match=r"OpsBudget expects a positive.*got -1"):
        policy.set_budget(-1)
    assert policy.budget == float(dense) / 3 and policy.k == k
    state = stream.state_dict()
    assert all(
        torch.equal(state["blocks"][b][name], tensor)
        for b, block in enumerate(snapshot["blocks"])
        for name, tensor in block.items()
    )


def test_latency_budget_change_to_a_non_positive_budget_is_rejected_and_kept():
    policy = eventful.LatencyBudget(20.0)
    with pytest.raises(ValueError, match=r"LatencyBudget expects a positive.*got 0"):
        policy.budget = 0
    assert policy.budget == 20.0


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("5:ops:1,3:ops:1", "budget schedule frame 3 follows frame 5; expected distinct frames"),
        ("5:ops:1,5:ops:2", "budget schedule frame 5 appears twice"),
        ("-1:ops:1", "budget schedule frame -1 is negative; expected frames >= 0"),
        ("abc", "malformed budget schedule entry 'abc'; expected FRAME:POLICY"),
        ("5:", "malformed budget schedule entry '5:'"),
        ("1.5:ops:1", "malformed budget schedule entry '1.5:ops:1'"),
        ("0:ops:1,", "malformed budget schedule entry ''"),
        ("5:banana", "malformed policy 'banana'"),
        ("5:ops:0", "OpsBudget expects a positive.*got 0.0"),
    ],
)
def test_malformed_budget_schedules_are_rejected(text, match):
    from eventful.core.budget import parse_schedule

    with pytest.raises(ValueError, match=match):
        parse_schedule(text)


DRIFT = {"refresh_every": 2, "error_bound": 0.5, "scene_cut_factor": 4}


@pytest.mark.parametrize(("make_bad", "error", "match"), BAD_FRAMES)
def test_bad_frames_with_drift_control_change_neither_state_nor_triggers(make_bad, error, match):
    model = make_model()
    drift = eventful.DriftControl(**DRIFT)
    stream, twin = (model.stream(batch_size=BATCH, drift=drift) for _ in range(2))
    for step in range(2):
        stream(frames(step))
        twin(frames(step))
    snapshot = stream.state_dict()
    with pytest.raises(error, match=match):
        stream(make_bad())
    assert stream.steps == 2 and stream.event_log == twin.event_log
    assert_untouched(stream, twin, snapshot)  # the next step refreshes both alike
    assert stream.events == twin.events and len(stream.events) == BATCH


def test_stream_rejects_a_drift_control_of_another_type():
    with pytest.raises(TypeError, match="drift must be a DriftControl or None, got 5"):
        make_model().stream(drift=5)


@pytest.mark.parametrize(
    ("cap", "match"),
    [
        (4, r"escalation max_tokens=4 is below the 5 tokens TopK\(5\) selects by itself; "
            r"expected max_tokens from 5 to 17"),
        (18, r"escalation max_tokens=18 exceeds the 17 tokens of this input; expected at most 17"),
    ],
)  # fmt: skip
def test_escalation_caps_outside_the_policys_count_and_the_token_count_are_rejected(cap, match):
    drift = eventful.DriftControl(escalation_bound=0.1, escalation_max_tokens=cap)
    stream = make_model().stream(batch_size=BATCH, drift=drift)
    with pytest.raises(ValueError, match=match):
        stream(frames(0))
    assert stream.steps == 0 and not stream.state.allocated and stream.event_log == []


def test_a_policy_whose_count_exceeds_the_escalation_cap_is_rejected_and_state_untouched():
    model = make_model()
    drift = eventful.DriftControl(escalation_bound=0.1, escalation_max_tokens=6)
    stream, twin = (model.stream(batch_size=BATCH, drift=drift) for _ in range(2))
    for step in range(2):
        stream(frames(step))
        twin(frames(step))
    snapshot = stream.state_dict()
    model.policy = eventful.TopK(8)
    with pytest.raises(ValueError, match="escalation max_tokens=6 is below the 8 tokens"):
        stream(frames(2))
    model.policy = eventful.TopK(5)
    assert stream.steps == 2
    assert_untouched(stream, twin, snapshot)
