"""Escalation: a gate selects beyond its policy while a stream's unprocessed share exceeds the
bound, never beyond the cap, and its extra ops are counted (and paid back by an OpsBudget)."""

import pytest
import torch

import eventful
from eventful.core.ops import dense_macs, eventful_block_macs
from eventful.synthetic import moving_squares
from tests.helpers import LEVELS, tiny_vit

NUM_TOKENS = 1 + 8 * 8  # tiny_vit: 64 x 64 input, 8 x 8 patches
GATES = ("qkv", "proj", "mlp")


def escalating(bound, max_tokens=None, **settings):
    return eventful.DriftControl(
        escalation_bound=bound, escalation_max_tokens=max_tokens, **settings
    )


def counts_per_gate(stream, index=0):
    return [selections[gate].counts[index] for selections in stream.trace.blocks for gate in GATES]


def test_a_stream_that_escalates_selects_more_than_its_policy_and_only_then():
    model = eventful.convert(tiny_vit(), policy=eventful.TopK(4))
    plain = model.stream(drift=None)
    watched = model.stream(drift=escalating(0.01))
    for index, frame in enumerate(moving_squares(8, size=64, seed=3)):
        plain(frame)
        watched(frame)
        if index == 0:
            continue  # dense first steps
        assert counts_per_gate(plain) == [4] * 9
        added = [added[gate][0] for added in watched.trace.escalated for gate in GATES]
        assert counts_per_gate(watched) == [4 + extra for extra in added]
    assert watched.ops.escalated > 0 and plain.ops.escalated == 0


@pytest.mark.parametrize("level", LEVELS)
def test_escalation_brings_every_gate_under_its_bound_when_the_cap_allows(level):
    model = eventful.convert(tiny_vit(), policy=eventful.TopK(4), level=level)
    bound = 0.02
    stream = model.stream(drift=escalating(bound))
    for frame in moving_squares(10, size=64, seed=5):
        stream(frame)
        for block in stream.trace.unprocessed:
            for share in block.values():
                assert share.item() <= bound * (1 + 1e-5)


@pytest.mark.parametrize("max_tokens", [4, 10, 30])
def test_escalation_never_exceeds_its_cap_nor_drops_the_policys_tokens(max_tokens):
    model = eventful.convert(tiny_vit(), policy=eventful.TopK(4))
    stream = model.stream(batch_size=2, drift=escalating(0.0, max_tokens))
    for frame in moving_squares(10, size=64, batch=2, seed=7):
        stream(frame)
        if stream.steps == 1:
            continue  # the first step is dense
        for stream_index in range(2):
            counts = counts_per_gate(stream, stream_index)
            assert all(4 <= count <= max_tokens for count in counts)
            # A bound of 0 asks for every changed token; past the first block's attention every
            # token has changed, so the cap binds there.
            assert max(counts) == max_tokens


def test_escalated_ops_are_the_ops_of_the_added_tokens():
    model = eventful.convert(tiny_vit(), policy=eventful.TopK(4))
    stream = model.stream(drift=escalating(0.01))
    spent = []
    for frame in moving_squares(8, size=64, seed=3):
        stream(frame)
        trace = stream.trace
        own_macs = 0
        for block, selections, added, recomputed in zip(
            model.encoder.blocks, trace.blocks, trace.escalated, trace.recomputed_rows, strict=True
        ):
            own = {gate: selections[gate].counts[0] - added[gate][0] for gate in GATES}
            fresh = 0 in trace.fresh_streams
            macs = eventful_block_macs(block, NUM_TOKENS, own, fresh, not fresh, recomputed[0])
            own_macs += sum(macs.values())
        assert stream.ops.escalated == stream.ops.total - own_macs
        spent.append(stream.ops.escalated)
    assert spent[0] == 0 and max(spent) > 0


@pytest.mark.parametrize("level", LEVELS)
def test_every_token_selected_with_escalation_matches_dense(level):
    vit = tiny_vit()
    model = eventful.convert(vit, policy=eventful.TopK(NUM_TOKENS), level=level)
    stream = model.stream(drift=escalating(0.0))
    for frame in moving_squares(5, size=64, seed=2):
        torch.testing.assert_close(stream(frame), vit(frame), rtol=1e-4, atol=1e-4)
        # Every token processed: nothing is left over, so nothing escalates.
        assert stream.trace.unprocessed_share.tolist() == [0.0]
        assert stream.ops.escalated == 0


def test_ops_budget_pays_back_what_escalation_spends_on_a_hard_stretch():
    model = eventful.convert(tiny_vit(), policy=eventful.TopK(4))
    budget = 0.35 * dense_macs(model.encoder.blocks, NUM_TOKENS) / 1e9
    model.policy = eventful.OpsBudget(budget)
    # Moving squares (every gate leaves at most 0.12 unprocessed at this budget), brightening
    # over frames 20-24: every token changes, and the gates escalate (shares up to 1).
    video = moving_squares(60, size=64, seed=4)
    video[20:25] += torch.linspace(0.2, 1.0, 5).view(5, 1, 1, 1, 1)
    stream = model.stream(drift=escalating(0.15))
    ops, escalated = [], []
    for frame in video:
        stream(frame)
        ops.append(stream.ops.total)
        escalated.append(stream.ops.escalated)
    assert sum(escalated[:20]) == 0 and sum(escalated[20:30]) > 0.1 * sum(ops[20:30])
    assert sum(ops) / len(ops) == pytest.approx(budget * 1e9, rel=0.05)
