"""Gates select exactly the tokens whose input changed, ranked by the policy's norm and counted
by its rule."""

import math

import pytest
import torch

import eventful
from eventful.core.gates import token_gate
from tests.helpers import LEVELS, tiny_vit


@pytest.mark.parametrize("level", LEVELS)
def test_identical_frame_updates_no_token_under_a_threshold(level, video):
    vit = tiny_vit()
    stream = eventful.convert(vit, policy=eventful.Threshold(1e-3), level=level).stream(drift=None)
    first = stream(video[0])
    again = stream(video[0].clone())
    for selections in stream.trace.blocks:
        assert all(selection.counts == [0] for selection in selections.values())
    assert torch.equal(first, again)
    assert stream.ops.by_category["linear"] == 0


def test_change_confined_to_one_region_selects_exactly_its_tokens_in_the_first_block(video):
    vit = tiny_vit()
    stream = eventful.convert(vit, policy=eventful.Threshold(1e-3), level="full").stream(drift=None)
    frame = video[0]
    stream(frame)
    changed = frame.clone()
    # Pixels rows 16..31, columns 40..55: patch rows 2-3, patch columns 5-6 of the 8x8 grid.
    changed[:, :, 16:32, 40:56] += 0.7
    stream(changed)
    expected = {1 + row * 8 + col for row in (2, 3) for col in (5, 6)}
    selected = stream.trace.blocks[0]["qkv"].per_stream[0].tolist()
    assert sorted(selected) == sorted(expected)


def test_topk_selects_the_tokens_of_largest_change(video):
    vit = tiny_vit()
    stream = eventful.convert(vit, policy=eventful.TopK(2), level="full").stream(drift=None)
    frame = video[0]
    stream(frame)
    changed = frame.clone()
    changed[:, :, 0:8, 0:8] += 2.0  # patch 0 -> token 1, the largest change
    changed[:, :, 56:64, 56:64] += 1.0  # patch 63 -> token 64
    changed[:, :, 24:32, 24:32] += 0.1  # patch 27 -> token 28, too small for k = 2
    stream(changed)
    assert sorted(stream.trace.blocks[0]["qkv"].per_stream[0].tolist()) == [1, 64]


def test_unselected_change_accumulates_until_it_is_selected():
    vit = tiny_vit()
    stream = eventful.convert(vit, policy=eventful.Threshold(0.5), level="tokenwise").stream(
        drift=None
    )
    frame = torch.zeros(1, 3, 64, 64)
    stream(frame)
    token_of_patch_zero = 1
    picked = []
    for _ in range(12):
        frame = frame.clone()
        frame[:, :, 0:8, 0:8] += 0.02  # a slow drift, far below the threshold per frame
        stream(frame)
        picked.append(token_of_patch_zero in stream.trace.blocks[0]["qkv"].per_stream[0].tolist())
    # The error against the reference grows each frame until the gate fires, then restarts.
    assert any(picked) and not all(picked)
    assert not picked[0]


# Three tokens whose change ranks differently under each norm (current - reference, D = 4):
# token 0 (3, 0, 0, 0): L1 3, L2 3, L-inf 3; token 1 (1.5, 1.5, 1.5, 0): L1 4.5, L2 2.60,
# L-inf 1.5; token 2 (2.2, 2.2, 0, 0): L1 4.4, L2 3.11, L-inf 2.2. Largest: L1 token 1, L2
# token 2, L-inf token 0.
CHANGE = torch.tensor([[[3.0, 0, 0, 0], [1.5, 1.5, 1.5, 0], [2.2, 2.2, 0, 0]]])
SELECTED_BY_NORM = {
    # the largest change
    "topk": (lambda norm: eventful.TopK(1, norm=norm), {1: [1], 2: [2], math.inf: [0]}),
    # round(0.34 x 3) = 1 token: the largest change
    "fraction": (
        lambda norm: eventful.TopFraction(0.34, norm=norm),
        {1: [1], 2: [2], math.inf: [0]},
    ),
    # changes of at least 2.9
    "threshold": (
        lambda norm: eventful.Threshold(2.9, norm=norm),
        {1: [0, 1, 2], 2: [0, 2], math.inf: [0]},
    ),
    # the largest changes until the rest sums to less than 6 (L1: 11.9, then 7.4, then 3;
    # L2: 8.71, then 5.60; L-inf: 6.7, then 3.7)
    "error_bound": (
        lambda norm: eventful.ErrorBound(6.0, norm=norm),
        {1: [1, 2], 2: [2], math.inf: [0]},
    ),
}


@pytest.mark.parametrize("norm", [1, 2, math.inf])
@pytest.mark.parametrize("policy", SELECTED_BY_NORM)
def test_policies_rank_the_gate_error_by_their_norm(policy, norm):
    make, selected = SELECTED_BY_NORM[policy]
    reference = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0))
    step = token_gate(reference + CHANGE, reference.clone(), torch.ones(1), make(norm), [])
    assert sorted(step.selection.per_stream[0].tolist()) == selected[norm]


@pytest.mark.parametrize("norm", [1, math.inf])
def test_a_stream_selects_by_the_norm_of_its_policy(norm):
    # Noise on every patch: the first block's qkv gate compares the embedded frame with the
    # embedding of the frame before (the first step is dense), and selects the top 8 under
    # `norm`, which are not the top 8 under the L2 norm.
    generator = torch.Generator().manual_seed(0)
    first = torch.rand(1, 3, 64, 64, generator=generator)
    second = first + 0.3 * torch.randn(1, 3, 64, 64, generator=generator)
    model = eventful.convert(tiny_vit(), policy=eventful.TopK(8, norm=norm))
    stream = model.stream(drift=None)
    stream(first)
    stream(second)
    change = model.embedding(second) - model.embedding(first)
    chosen = set(stream.trace.blocks[0]["qkv"].per_stream[0].tolist())
    for order in (norm, 2):
        top = torch.linalg.vector_norm(change, ord=order, dim=-1).topk(8).indices[0]
        assert (chosen == set(top.tolist())) == (order == norm)


@pytest.mark.parametrize(
    ("fraction", "num_tokens", "count"),
    [
        (1.0, 65, 65),  # every token
        (0.25, 65, 16),  # 16.25
        (0.25, 67, 17),  # 16.75
        (0.25, 66, 16),  # 16.5: Python's round takes a half to the even count
        (0.25, 70, 18),  # 17.5: likewise
        (0.01, 65, 1),  # 0.65
        (0.005, 65, 1),  # 0.325 rounds to 0: at least one token
        (0.125, 4, 1),  # 0.5 rounds to 0: at least one token
    ],
)
def test_top_fraction_selects_round_of_fraction_times_tokens_and_at_least_one(
    fraction, num_tokens, count
):
    policy = eventful.TopFraction(fraction)
    assert policy.count(num_tokens) == count
    assert policy.select(torch.rand(2, num_tokens)).counts == [count, count]


def test_top_fraction_count_holds_at_every_gate_of_a_stream(video):
    stream = eventful.convert(tiny_vit(), policy=eventful.TopFraction(0.25)).stream(drift=None)
    stream(video[0])
    stream(video[1])
    counts = {c for block in stream.trace.blocks for s in block.values() for c in s.counts}
    assert counts == {16}  # round(0.25 x 65 tokens)


def test_every_token_is_one_selection_of_everything_without_a_sort():
    from eventful.core.policies import select_largest

    norms = torch.rand(2, 7)
    assert select_largest(norms, 7).everything
    assert not select_largest(norms, 6).everything


@pytest.mark.parametrize("level", LEVELS)
def test_an_untraced_step_of_every_token_keeps_the_references_a_later_policy_needs(level, video):
    # Untraced, a gate whose policy takes every token skips its error; the traced stream
    # computes it. Both keep their references, so a later TopK continues alike.
    model = eventful.convert(tiny_vit(), policy=eventful.TopK(65), level=level)
    traced, untraced = model.stream(drift=None), model.stream(drift=None, count_ops=False)
    with torch.no_grad():
        for frame in video[:3]:
            assert torch.equal(traced(frame), untraced(frame))
        model.policy = eventful.TopK(8)
        for frame in video[3:6]:
            assert torch.equal(traced(frame), untraced(frame))
