"""Budget controllers: OpsBudget meets an ops budget, LatencyBudget a time budget (driven by a
fake clock, never real time), both follow budget changes; Threshold's floor and ceiling."""

import math

import pytest
import torch

import eventful
from eventful.core.budget import parse_schedule, scheduled_policy
from eventful.core.ops import dense_macs, largest_topk_within, steady_topk_macs
from eventful.core.policies import StepReport, parse_policy
from eventful.synthetic import moving_squares
from tests.helpers import LEVELS, tiny_vit

NUM_TOKENS = 1 + 8 * 8  # tiny_vit: 64 x 64 input, 8 x 8 patches


def converted(level="exact", policy=None):
    return eventful.convert(tiny_vit(), policy=policy or eventful.TopK(8), level=level)


def dense_gops(model, num_tokens=NUM_TOKENS):
    return dense_macs(model.encoder.blocks, num_tokens) / 1e9


def run(stream, frames, before_step=None):
    """Per frame: the k the policy held going into the step, and the step's ops per stream."""
    ks, ops = [], []
    for index, frame in enumerate(frames):
        if before_step is not None:
            before_step(index)
        ks.append(stream.model.policy.k)
        stream(frame)
        ops.append(stream.ops.total / stream.batch_size)
    return ks, ops


# --- OpsBudget -------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("batch", [1, 2])
def test_ops_budget_meets_the_budget_on_average_over_a_clip(level, batch):
    model = converted(level)
    budget = 0.3 * dense_gops(model)
    model.policy = eventful.OpsBudget(budget)
    stream = model.stream(batch_size=batch, drift=None)
    _, ops = run(stream, moving_squares(40, size=64, batch=batch, seed=2))
    assert ops[0] == dense_macs(model.encoder.blocks, NUM_TOKENS)  # the first step is dense
    assert sum(ops) / len(ops) == pytest.approx(budget * 1e9, rel=0.05)


@pytest.mark.parametrize("level", ["tokenwise", "exact"])
def test_ops_budget_pays_back_dense_refreshes(level):
    model = converted(level)
    budget = 0.4 * dense_gops(model)
    model.policy = eventful.OpsBudget(budget)
    stream = model.stream(drift=eventful.DriftControl(refresh_every=10))
    _, ops = run(stream, moving_squares(40, size=64, seed=3))
    dense = dense_macs(model.encoder.blocks, NUM_TOKENS)
    assert [index for index, value in enumerate(ops) if value >= dense] == [0, 10, 20, 30]
    assert sum(ops) / len(ops) == pytest.approx(budget * 1e9, rel=0.05)


def test_ops_budget_starts_at_the_largest_k_the_op_model_allows():
    model = converted()
    blocks = model.encoder.blocks
    policy = eventful.OpsBudget(0.25 * dense_gops(model))
    policy.validate(NUM_TOKENS, blocks)
    k = policy.k
    assert steady_topk_macs(blocks, NUM_TOKENS, k) <= policy.budget * 1e9
    assert steady_topk_macs(blocks, NUM_TOKENS, k + 1) > policy.budget * 1e9
    assert k == largest_topk_within(blocks, NUM_TOKENS, policy.budget * 1e9)


def test_ops_budget_steps_cost_exactly_what_the_op_model_predicts_for_the_chosen_k():
    # Tokenwise attention recomputes nothing beyond the selection: ops follow from k alone.
    model = converted("tokenwise")
    blocks = model.encoder.blocks
    model.policy = eventful.OpsBudget(0.3 * dense_gops(model))
    ks, ops = run(model.stream(), moving_squares(20, size=64, seed=4))
    for k, measured in zip(ks[1:], ops[1:], strict=True):
        assert measured == steady_topk_macs(blocks, NUM_TOKENS, k)


def test_ops_budget_follows_a_budget_change_within_a_few_frames():
    model = converted("tokenwise")
    blocks = model.encoder.blocks
    high, low = 0.5 * dense_gops(model), 0.25 * dense_gops(model)
    model.policy = eventful.OpsBudget(high)
    token = steady_topk_macs(blocks, NUM_TOKENS, 2) - steady_topk_macs(blocks, NUM_TOKENS, 1)

    def lower_at_30(index):
        if index == 30:
            model.policy.budget = low

    _, ops = run(model.stream(), moving_squares(60, size=64, seed=5), lower_at_30)
    # From 3 frames after the change on, every frame is within two tokens' ops of the budget.
    assert all(abs(value - low * 1e9) <= 2 * token for value in ops[33:])
    assert sum(ops[30:]) / 30 == pytest.approx(low * 1e9, rel=0.02)
    assert sum(ops[20:30]) / 10 == pytest.approx(high * 1e9, rel=0.02)


def test_ops_budget_without_feedback_keeps_the_op_model_k():
    model = converted()
    policy = model.policy = eventful.OpsBudget(0.3 * dense_gops(model))
    state = model.new_state(1)
    for frame in moving_squares(5, size=64, seed=6):
        model(frame, state)  # the functional form never calls observe
    assert policy.k == largest_topk_within(model.encoder.blocks, NUM_TOKENS, policy.budget * 1e9)
    assert policy.debt == 0


def test_ops_budget_ignores_steps_without_op_counts():
    model = converted()
    policy = model.policy = eventful.OpsBudget(0.3 * dense_gops(model))
    stream = model.stream(count_ops=False)
    stream(moving_squares(1, size=64)[0])
    assert policy.debt == 0


def test_ops_budget_with_a_shorter_horizon_pays_back_a_refresh_sooner():
    # After each step k is the largest the op model puts within the budget less 1/horizon of
    # the debt. A refresh (frame 30) adds a dense step's ops beyond the budget to the debt, and
    # each later step pays back about 1/horizon of what is left (at most the budget less the ops
    # of k = 1). Tokenwise attention: ops follow from k alone.
    remaining, dips = {}, {}
    for horizon in (2, 16):
        model = converted("tokenwise")
        blocks = model.encoder.blocks
        dense = dense_macs(blocks, NUM_TOKENS)
        policy = model.policy = eventful.OpsBudget(0.3 * dense / 1e9, horizon=horizon)
        stream = model.stream(drift=eventful.DriftControl(refresh_every=30))
        debts = []
        for frame in moving_squares(40, size=64, seed=3):
            stream(frame)
            debts.append(policy.debt)
            target = policy.budget * 1e9 - policy.debt / horizon
            assert policy.k == max(1, largest_topk_within(blocks, NUM_TOKENS, target))
            if stream.events:
                dips[horizon] = policy.k
        assert debts[30] - debts[29] == pytest.approx(dense - policy.budget * 1e9)
        remaining[horizon] = debts[38] / debts[30]  # the share left 8 steps after the refresh
    # A short horizon drops k to 1 and has paid back nearly all of it 8 steps later; a long
    # one lowers k a little and still owes more than half of it (about (15/16)^8).
    assert dips[2] == 1 < dips[16]
    assert remaining[2] < 0.1 and remaining[16] > 0.5


# --- LatencyBudget, on a fake machine --------------------------------------------------------


class FakeMachine:
    """A clock for one stream: a step takes slowdown * (a + b * tokens) seconds, tokens being
    the k of the policy, or every token when the stream runs densely."""

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b, self.slowdown = a, b, 1.0
        self.now = 0.0
        self.stream = None
        self.started = False

    def __call__(self) -> float:
        if not self.started:
            dense = all(self.stream.state.fresh)
            self.tokens = NUM_TOKENS if dense else self.stream.model.policy.k
        else:
            self.now += self.slowdown * (self.a + self.b * self.tokens)
        self.started = not self.started
        return self.now


def latency_stream(ms, a=0.002, b=0.0001, **options):
    model = converted(policy=eventful.LatencyBudget(ms, **options))
    machine = FakeMachine(a, b)
    stream = model.stream(clock=machine, drift=None)
    machine.stream = stream
    return stream, machine


def test_latency_budget_settles_on_the_largest_k_within_the_budget():
    stream, _ = latency_stream(6.05)  # 2 ms + 0.1 ms per token: 40 tokens fit
    ks, _ = run(stream, moving_squares(12, size=64, seed=7))
    assert ks[4:] == [40] * 8
    assert stream.seconds == pytest.approx(0.006)  # 2 ms + 40 x 0.1 ms


def test_latency_budget_follows_a_slowdown_and_a_speedup_within_a_few_frames():
    stream, machine = latency_stream(6.05)

    def change_speed(index):
        machine.slowdown = {15: 2.0, 30: 1.0}.get(index, machine.slowdown)

    ks, _ = run(stream, moving_squares(45, size=64, seed=8), change_speed)
    assert ks[10:16] == [40] * 6
    assert ks[19:30] == [10] * 11  # 2 x (2 ms + 0.1 ms k) <= 6.05 ms
    assert ks[34:] == [40] * 11


def test_latency_budget_follows_a_budget_change_within_a_few_frames():
    stream, _ = latency_stream(6.05)

    def tighten_at_15(index):
        if index == 15:
            stream.model.policy.budget = 4.05

    ks, _ = run(stream, moving_squares(25, size=64, seed=9), tighten_at_15)
    assert ks[10:15] == [40] * 5
    assert ks[18:] == [20] * 7


@pytest.mark.parametrize(("ms", "k"), [(1.0, 1), (1000.0, NUM_TOKENS)])
def test_latency_budget_keeps_k_between_one_and_every_token(ms, k):
    stream, _ = latency_stream(ms)
    ks, _ = run(stream, moving_squares(6, size=64, seed=10))
    assert ks[3:] == [k] * 3


# A 20% slowdown from frame 15 on: a step then takes 1.2 (2 ms + 0.1 ms k), so a budget of
# 6.05 ms fits k = 30 instead of 40.
SLOWER_K = math.floor((6.05 / 1.2 - 2.0) / 0.1)


def run_with_a_slowdown_at_15(stream, machine):
    """Per frame, the k going into the step and the number of steps the fit holds."""
    history = []

    def slow_down_at_15(index):
        history.append(len(stream.model.policy.steps))
        if index == 15:
            machine.slowdown = 1.2

    ks, _ = run(stream, moving_squares(25, size=64, seed=8), slow_down_at_15)
    return ks, history


@pytest.mark.parametrize("window", [2, 4])
def test_latency_budget_fits_only_the_last_window_steps(window):
    # Within the tolerance (30%), the slowdown drops no step: k reaches the slower machine's
    # value once the steps from before it have left the window.
    stream, machine = latency_stream(6.05, window=window)
    ks, history = run_with_a_slowdown_at_15(stream, machine)
    assert max(history) == window
    assert ks[15 + window - 1] > SLOWER_K
    assert ks[15 + window :] == [SLOWER_K] * (10 - window)


@pytest.mark.parametrize("tolerance", [0.1, 0.3])
def test_latency_budget_drops_its_history_at_a_step_off_the_fit_by_more_than_tolerance(tolerance):
    stream, machine = latency_stream(6.05, tolerance=tolerance)  # a window of 8 steps
    ks, history = run_with_a_slowdown_at_15(stream, machine)
    assert history[15] == 8  # the fit holds 8 steps before the slowdown
    if tolerance < 0.2:
        # The slow step strays by 20%: the fit starts over from it, and k follows at once.
        assert history[16] == 1
        assert ks[17:] == [SLOWER_K] * 8
    else:
        # Taken for noise: the fast steps stay in the fit, and k comes down step by step.
        assert history[16] == 8
        assert all(k > SLOWER_K for k in ks[16:21])


def test_latency_budget_with_room_for_every_token_equals_the_dense_model():
    vit = tiny_vit()
    stream, _ = latency_stream(1000.0)
    for frame in moving_squares(6, size=64, seed=11):
        assert torch.allclose(stream(frame), vit(frame), atol=1e-4)


def test_latency_budget_without_feedback_keeps_every_token():
    model = converted(policy=eventful.LatencyBudget(5.0))
    state = model.new_state(1)
    for frame in moving_squares(4, size=64, seed=12):
        model(frame, state)
    assert model.policy.k == NUM_TOKENS
    model.policy.observe(StepReport(0.0, 1, [], None))  # a zero-length step teaches nothing
    assert model.policy.k == NUM_TOKENS


def test_only_the_latency_budget_asks_the_stream_for_wall_time():
    assert eventful.LatencyBudget(5.0).needs_wall_time
    assert not eventful.OpsBudget(1.0).needs_wall_time
    assert not eventful.TopK(3).needs_wall_time


# --- Threshold with a floor and a ceiling ----------------------------------------------------


def test_threshold_floor_and_ceiling_bound_each_streams_count_to_its_largest_errors():
    errors = torch.tensor(
        [
            [0.1, 0.9, 0.2, 0.8, 0.7, 0.6],  # 4 above 0.5: the ceiling keeps the 3 largest
            [0.1, 0.2, 0.3, 0.0, 0.4, 0.1],  # none above 0.5: the floor takes the 2 largest
            [0.1, 0.6, 0.2, 0.7, 0.0, 0.1],  # 2 above 0.5: within both bounds
        ]
    )
    selection = eventful.Threshold(0.5, min_tokens=2, max_tokens=3).select(errors)
    chosen = [sorted(index.tolist()) for index in selection.per_stream]
    assert chosen == [[1, 3, 4], [2, 4], [1, 3]]


def test_threshold_ceiling_above_the_token_count_changes_nothing():
    errors = torch.rand(2, 6)
    bounded = eventful.Threshold(0.3, max_tokens=100).select(errors)
    plain = eventful.Threshold(0.3).select(errors)
    assert torch.equal(bounded.flat, plain.flat)


@pytest.mark.parametrize("level", LEVELS)
def test_threshold_bounds_hold_at_every_gate_of_a_run(level):
    model = converted(level, eventful.Threshold(0.5, min_tokens=4, max_tokens=20))
    stream = model.stream(batch_size=2, drift=None)
    video = moving_squares(8, size=64, batch=2, seed=13)
    stream(video[0])  # dense
    for frame in video[1:]:
        stream(frame)
        counts = [c for block in stream.trace.blocks for s in block.values() for c in s.counts]
        assert min(counts) >= 4 and max(counts) <= 20
    assert repr(model.policy) == "Threshold(0.5, min_tokens=4, max_tokens=20)"


# --- command-line forms and schedules --------------------------------------------------------


def test_parse_policy_reads_ops_and_latency_budgets():
    ops, latency = parse_policy("ops:1.5"), parse_policy("latency:40")
    assert isinstance(ops, eventful.OpsBudget) and ops.budget == 1.5
    assert isinstance(latency, eventful.LatencyBudget) and latency.budget == 40.0
    assert (repr(ops), repr(latency)) == ("OpsBudget(1.5)", "LatencyBudget(40.0)")


def test_parse_schedule_reads_frames_and_policies_in_order():
    schedule = parse_schedule("0:fraction:0.5, 100:ops:1.5,200:latency:40")
    assert [frame for frame, _ in schedule] == [0, 100, 200]
    assert [repr(policy) for _, policy in schedule] == [
        "TopFraction(0.5)",
        "OpsBudget(1.5)",
        "LatencyBudget(40.0)",
    ]


def test_a_scheduled_budget_of_the_same_kind_keeps_what_the_controller_learned():
    current = eventful.LatencyBudget(6.0)
    current.validate(NUM_TOKENS)
    current.observe(StepReport(0.008, 1, [0], None))
    after = scheduled_policy(current, eventful.LatencyBudget(3.0))
    assert after is current and after.budget == 3.0 and len(after.steps) == 1
    other = eventful.OpsBudget(1.0)
    assert scheduled_policy(current, other) is other
    topk = eventful.TopK(3)
    assert scheduled_policy(eventful.TopK(5), topk) is topk


# --- real weights on real frames -------------------------------------------------------------


@pytest.fixture(scope="module")
def saliency_model(tmp_path_factory):
    from eventful.models.imgfocus import imgfocus_saliency

    return imgfocus_saliency(cache_dir=tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def bikes():
    """The first 40 frames of bikes.mp4, each (1, 3, 224, 224)."""
    from eventful.video.clips import registry_clip
    from eventful.video.decode import decode_frames
    from eventful.video.preprocess import letterbox

    return [letterbox(f).unsqueeze(0) for f in decode_frames(registry_clip("bikes.mp4"), 40)]


def test_ops_budget_meets_the_budget_on_real_frames_with_real_weights(saliency_model, bikes):
    # The budget covers the whole model: the encoder and its saliency decoder.
    tokens = 1 + 16 * 16
    model = eventful.convert(saliency_model, policy=eventful.TopK(tokens))
    probe = model.stream(drift=None)
    probe(bikes[0])
    head = probe.ops.by_category["head"]
    assert probe.ops.dense == dense_macs(model.encoder.blocks, tokens) + head  # the head in full
    budget = 0.3 * probe.ops.dense / 1e9
    model.policy = eventful.OpsBudget(budget)
    stream = model.stream(drift=None)
    ks, ops = run(stream, bikes)
    assert sum(ops) / len(ops) == pytest.approx(budget * 1e9, rel=0.05)
    assert min(ks[20:]) > 1  # the dense first frame is paid back by then
