"""The paper's baselines as options of the same engine: the STGT gate, top-k ATS."""

import pytest
import torch

import eventful
from eventful.core.gates import token_gate
from eventful.core.kv_pooling import pool_keys_values
from eventful.methods.ats import ATS
from eventful.methods.kv_pooling import KVPooling
from eventful.synthetic import moving_squares
from tests.helpers import assert_equal_up_to_rounding, tiny_vit


def drifting_token(steps: int) -> list[torch.Tensor]:
    """(1, 2, 4) inputs: token 0 moves by 0.6 along one axis at every step, token 1 is still."""
    base = torch.zeros(1, 2, 4)
    inputs = []
    for step in range(steps):
        current = base.clone()
        current[0, 0, 0] = 0.6 * step
        inputs.append(current)
    return inputs


@pytest.mark.parametrize(("previous_frame", "selected_at"), [(False, [2, 4]), (True, [])])
def test_the_stgt_gate_misses_slow_drift_that_the_reference_gate_catches(
    previous_frame, selected_at
):
    policy = eventful.Threshold(1.0)  # between one step's change (0.6) and two steps' (1.2)
    inputs = drifting_token(6)
    reference, scale = inputs[0].clone(), torch.ones(1)
    chosen = []
    for step, current in enumerate(inputs[1:], start=1):
        gate = token_gate(current, reference, scale, policy, [], previous_frame=previous_frame)
        if 0 in gate.selection.per_stream[0].tolist():
            chosen.append(step)
    assert chosen == selected_at


@pytest.mark.parametrize("level", ["tokenwise", "qk", "full", "exact"])
def test_stgt_with_every_token_selected_is_the_dense_model(level):
    vit = tiny_vit()
    video = moving_squares(5, size=64, batch=2, seed=1)
    converted = eventful.convert(vit, policy=eventful.TopFraction(1.0), level=level)
    converted.gate_reference = "previous"
    stream = converted.stream(batch_size=2)
    with torch.no_grad():
        for frame in video:
            assert_equal_up_to_rounding(stream(frame), vit(frame))


def test_stgt_selects_on_the_change_since_the_previous_frame_in_a_model():
    """A frame that brightens slowly: every patch's embedding moves by the same small step.
    The threshold lies between one step and two: the reference gate selects every patch at
    every second step, the STGT gate never."""
    vit = tiny_vit()
    base = moving_squares(1, size=64, batch=1, seed=1)[0]
    video = [base + 0.05 * step for step in range(6)]
    with torch.no_grad():
        step = torch.linalg.vector_norm(vit.embedding(video[1]) - vit.embedding(video[0]), dim=-1)
    threshold = 1.5 * float(step[0, 1:].max())
    assert threshold < 2 * float(step[0, 1:].min())
    counts = {}
    for reference in ("processed", "previous"):
        converted = eventful.convert(vit, policy=eventful.Threshold(threshold), level="exact")
        converted.gate_reference = reference
        assert converted.gate_reference == reference
        stream = converted.stream(drift=None)
        selected = []
        for frame in video:
            stream(frame)
            selected.append(stream.trace.blocks[0]["qkv"].counts[0])
        counts[reference] = selected
    assert counts["processed"] == [65, 0, 64, 0, 64, 0]
    assert counts["previous"] == [65, 0, 0, 0, 0, 0]


def test_a_bad_gate_reference_is_refused():
    converted = eventful.convert(tiny_vit(), policy=eventful.TopFraction(0.5))
    with pytest.raises(ValueError, match='"processed" or "previous"'):
        converted.gate_reference = "last"
    assert converted.gate_reference == "processed"


def vit_frames(batch: int = 2) -> torch.Tensor:
    return moving_squares(1, size=64, batch=batch, seed=4)[0]


def test_ats_keeping_every_patch_is_the_dense_model():
    vit = tiny_vit(num_registers=1)
    frames = vit_frames()
    result = ATS(vit, {1: 64, 2: 64})(frames)
    with torch.no_grad():
        want = vit(frames)
    assert_equal_up_to_rounding(result.tokens, want)


def test_ats_keeps_its_budget_of_the_most_significant_patches():
    vit = tiny_vit()
    frames = vit_frames()
    ats = ATS(vit, {1: 20, 2: 8})
    result = ats(frames)
    kept = [group.sum(dim=1).tolist() for group in result.kept]
    assert kept == [[64, 64], [20, 20], [8, 8]]
    assert bool((result.kept[2] <= result.kept[1]).all())  # a dropped patch never returns
    scores = result.probabilities[1]
    assert torch.allclose(scores.sum(dim=1), torch.ones(2))
    assert bool(result.kept[1].gather(1, scores.argmax(dim=1, keepdim=True)).all())


def test_ats_op_counts_follow_the_hand_derived_formula():
    vit = tiny_vit()  # width 48, MLP 192, 3 blocks, 1 + 64 tokens
    result = ATS(vit, {1: 20, 2: 8})(vit_frames(1))
    dim, hidden = 48, 192

    def block(tokens: int) -> int:
        weights = 3 * dim * dim + dim * dim + 2 * dim * hidden
        biases = 3 * dim + dim + hidden + dim
        linear = tokens * (weights + biases)
        attention = 2 * tokens * tokens * dim
        return linear + attention + 2 * tokens * dim  # the two residual adds

    def scores(patches: int) -> int:
        return (1 + patches) * 3 * dim * dim + (1 + patches) * dim + patches * dim

    want = block(65) + scores(64) + block(21) + scores(20) + block(9)
    assert result.macs == [want]


def test_bad_ats_settings_are_refused():
    vit = tiny_vit()
    with pytest.raises(ValueError, match="ATS budget 65 at block 1 is above the 64 patch tokens"):
        ATS(vit, {1: 65})(vit_frames())
    with pytest.raises(ValueError, match="must be a positive integer, got 0"):
        ATS(vit, {1: 0})
    with pytest.raises(ValueError, match=r"ATS block 3 outside 0\.\.2"):
        ATS(vit, {3: 10})
    with pytest.raises(ValueError, match="class token"):
        ATS(tiny_vit(class_token=False), {1: 10})


def test_pooled_keys_and_values_are_cell_means_after_the_prefix():
    prefix = torch.tensor([100.0, 200.0]).view(1, 1, 2, 1)
    keys = torch.cat([prefix, torch.arange(16.0).view(1, 1, 16, 1)], dim=2)  # (B, H, 2 + 16, 1)
    pooled, _ = pool_keys_values(keys, keys, (4, 4), 2)
    # the 4 x 4 grid 0..15 in 2 x 2 cells: (0 1 4 5), (2 3 6 7), (8 9 12 13), (10 11 14 15)
    assert pooled.flatten().tolist() == [100.0, 200.0, 2.5, 4.5, 10.5, 12.5]


def test_kv_pooling_factor_one_is_the_dense_model():
    vit = tiny_vit(num_registers=1)
    frames = vit_frames()
    with torch.no_grad():
        want = vit(frames)
    assert_equal_up_to_rounding(KVPooling(vit, 1)(frames).tokens, want)


def test_pooling_with_every_token_selected_is_pooling_alone():
    vit = tiny_vit()
    video = moving_squares(4, size=64, batch=2, seed=2)
    converted = eventful.convert(vit, policy=eventful.TopFraction(1.0), level="tokenwise")
    converted.kv_pooling = 2
    stream = converted.stream(batch_size=2)
    alone = KVPooling(vit, 2)
    for frame in video:
        assert_equal_up_to_rounding(stream(frame), alone(frame).tokens)
    with torch.no_grad():
        assert not torch.allclose(alone(video[0]).tokens, vit(video[0]), atol=1e-3)


def test_kv_pooling_op_counts_follow_the_hand_derived_formula():
    vit = tiny_vit()  # width 48, MLP 192, 3 blocks, 1 + 64 tokens on an 8 x 8 grid
    result = KVPooling(vit, 2)(vit_frames(1))
    dim, hidden, tokens, keys = 48, 192, 65, 1 + 16
    weights = 3 * dim * dim + dim * dim + 2 * dim * hidden
    biases = 3 * dim + dim + hidden + dim
    attention = 2 * tokens * keys * dim
    adds = 2 * 64 * dim + 2 * tokens * dim  # averaging keys and values; residuals
    assert result.macs == 3 * (tokens * (weights + biases) + attention + adds)
    converted = eventful.convert(vit, policy=eventful.TopFraction(0.25), level="tokenwise")
    converted.kv_pooling = 2
    stream = converted.stream(drift=None)
    for frame in moving_squares(2, size=64, batch=1, seed=2):
        stream(frame)
    assert stream.ops.per_stream[0]["attention"] == 3 * attention  # every query, pooled keys


def test_bad_kv_pooling_is_refused_and_leaves_the_stream_unchanged():
    vit = tiny_vit()
    with pytest.raises(ValueError, match="does not divide the 8x8 patch grid"):
        KVPooling(vit, 3)(vit_frames())
    converted = eventful.convert(vit, policy=eventful.TopFraction(0.5), level="exact")
    with pytest.raises(ValueError, match="tokenwise level only"):
        converted.kv_pooling = 2
    tokenwise = eventful.convert(vit, policy=eventful.TopFraction(0.5), level="tokenwise")
    with pytest.raises(ValueError, match="positive integer, got 0"):
        tokenwise.kv_pooling = 0
    stream = tokenwise.stream(drift=None)
    frames = moving_squares(2, size=64, batch=1, seed=2)
    stream(frames[0])
    snapshot = stream.state_dict()
    tokenwise.kv_pooling = 3
    with pytest.raises(ValueError, match="does not divide the 8x8 patch grid"):
        stream(frames[1])
    for before, after in zip(snapshot["blocks"], stream.state_dict()["blocks"], strict=True):
        assert all(torch.equal(before[name], after[name]) for name in before)
