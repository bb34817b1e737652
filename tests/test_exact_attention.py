"""The exact level keeps attention exact with respect to the buffered q, k, v."""

import pytest
import torch

import eventful
from eventful.core.attention import (
    Changes,
    at_positions,
    recompute_attention_rows,
    recompute_full_attention,
    update_exact_attention,
    update_exact_groups,
    update_full_attention,
)
from tests.helpers import tiny_vit

POLICIES = {"topk": eventful.TopK(9), "threshold": eventful.Threshold(0.7)}


@pytest.mark.parametrize("policy", POLICIES)
def test_exact_level_equals_dense_attention_over_the_buffers(policy, video):
    # The tokenwise level runs dense attention over the same buffered q, k, v, with the same
    # gates, so the exact level must give the same outputs: its only approximation is the gates.
    vit = tiny_vit(layer_scale_init=0.5)
    exact = eventful.convert(vit, policy=POLICIES[policy], level="exact").stream()
    tokenwise = eventful.convert(vit, policy=POLICIES[policy], level="tokenwise").stream()
    for frame in video:
        assert torch.allclose(exact(frame), tokenwise(frame), atol=1e-4)
        assert exact.trace.blocks[0]["qkv"].counts == tokenwise.trace.blocks[0]["qkv"].counts


def test_exact_level_is_closer_to_dense_than_the_full_level(video):
    vit = tiny_vit()
    errors = {}
    for level in ("full", "exact"):
        stream = eventful.convert(vit, policy=eventful.TopK(9), level=level).stream()
        errors[level] = max((stream(f) - vit(f)).abs().max().item() for f in video)
    assert errors["exact"] < errors["full"]


def dense_attention(q, k, v):
    return torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v


def running_sums(q, k, v):
    heads, tokens, width = q.shape
    sums = (
        torch.zeros(heads, tokens, width),
        torch.zeros(heads, tokens),
        torch.zeros(heads, tokens),
    )
    recompute_attention_rows(*sums, q, k, v, torch.arange(tokens))
    return sums


def test_updates_follow_many_changes_of_keys_values_and_queries():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 4, generator=generator) for _ in range(3))
    sums = running_sums(q, k, v)
    for _ in range(50):
        index = torch.randperm(12, generator=generator)[:2]  # below the recompute (12 / 5)
        old_keys, old_values = k[:, index].clone(), v[:, index].clone()
        for tensor in (q, k, v):
            tensor[:, index] += 0.5 * torch.randn(2, 2, 4, generator=generator)
        update_exact_attention(*sums, q, k, v, old_keys, old_values, index)
    numerator, denominator, _ = sums
    output = numerator / denominator.unsqueeze(-1)
    assert torch.allclose(output, dense_attention(q, k, v), atol=1e-4)


def test_groups_updated_at_once_equal_each_group_updated_alone():
    """Ragged counts (2, 1, 0 and 2 changed tokens) in one batched call, padded with tokens
    that did not change, against each group on its own."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 2, 12, 4, generator=generator) for _ in range(3))
    k[1, :, 0] = 40.0  # group 1: a dominant key that collapses below, so rows underflow
    singles = [running_sums(q[b], k[b], v[b]) for b in range(4)]
    batched = [torch.stack([sums[part] for sums in singles]) for part in range(3)]
    singles = [tuple(part.clone() for part in sums) for sums in singles]
    changed = torch.zeros(4, 12, dtype=torch.bool)  # at most 2: below the recompute (12 / 5)
    changed[0, [2, 9]] = True
    changed[1, 0] = True
    changed[3, [1, 11]] = True
    changes = Changes.from_mask(changed)
    assert changes.index.shape == (4, 2) and changes.valid.sum(1).tolist() == [2, 1, 0, 2]
    old_keys, old_values = at_positions(k, changes.index), at_positions(v, changes.index)
    indices = [row.nonzero().squeeze(1) for row in changed]
    old_singles = [
        (k[b][:, index].clone(), v[b][:, index].clone()) for b, index in enumerate(indices)
    ]
    for tensor in (q, k, v):
        moved = 0.5 * torch.randn(tensor.shape, generator=generator)
        tensor += moved * changed[:, None, :, None]
    k[1, :, 0] = -40.0
    counts = update_exact_groups(*batched, q, k, v, old_keys, old_values, changes)
    for group, index in enumerate(indices):
        recomputed = update_exact_attention(
            *singles[group], q[group], k[group], v[group], *old_singles[group], index
        )
        assert counts[group] == recomputed
        for got, want in zip(batched, singles[group], strict=True):
            torch.testing.assert_close(got[group], want, rtol=1e-5, atol=1e-5)
    assert counts[1] > 0 and counts[0] == counts[2] == counts[3] == 0


def test_a_dominant_key_that_collapses_triggers_a_row_recompute():
    q = torch.ones(1, 6, 2)  # 1 of 6 keys changes: below the recompute (6 / 5)
    k = torch.zeros(1, 6, 2)
    k[0, 0] = 40.0  # logit 80 for every query: it dominates every row
    v = torch.arange(12.0).reshape(1, 6, 2)
    sums = running_sums(q, k, v)
    index = torch.tensor([0])
    old_keys, old_values = k[:, index].clone(), v[:, index].clone()
    k[0, 0] = -40.0  # now logit -80: the rows' shift (80) is far above every logit
    recomputed = update_exact_attention(*sums, q, k, v, old_keys, old_values, index)
    numerator, denominator, _ = sums
    assert recomputed == 5  # rows 1..5 underflowed (row 0 is a changed query, recomputed anyway)
    assert torch.allclose(numerator / denominator.unsqueeze(-1), dense_attention(q, k, v))


def test_no_change_leaves_the_sums_untouched():
    q, k, v = (torch.randn(2, 6, 4) for _ in range(3))
    sums = running_sums(q, k, v)
    before = [t.clone() for t in sums]
    empty = torch.zeros(0, dtype=torch.long)
    assert update_exact_attention(*sums, q, k, v, k[:, empty], v[:, empty], empty) == 0
    assert all(torch.equal(a, b) for a, b in zip(sums, before, strict=True))


@pytest.mark.parametrize("level", ["exact", "full"])
def test_rows_whose_dominant_key_changes_keep_their_precision(level):
    # Every query attends almost only to key 0 (logit 12 above the rest). When key 0 drops,
    # the rows' running sums lose about 5 of float32's 7 digits to cancellation without being
    # near underflow; they must be recomputed, so attention stays exact to the buffers.
    generator = torch.Generator().manual_seed(3)
    q = torch.zeros(2, 40, 4)
    q[..., 0] = 4.0
    k = 0.1 * torch.randn(2, 40, 4, generator=generator)
    k[:, 0, 0] = 3.0
    v = torch.randn(2, 40, 4, generator=generator)
    index = torch.tensor([0, 7])
    if level == "exact":
        sums = running_sums(q, k, v)
    else:
        sums = (
            torch.empty(2, 40, 4),
            torch.empty(2, 40, 40),
            torch.empty(2, 40),
            torch.empty(2, 40),
        )
        recompute_full_attention(*sums, q, k, v)
    old_keys, old_values = k[:, index].clone(), v[:, index].clone()
    k[:, 0, 0] = -3.0
    k[:, 7] += 0.1
    if level == "exact":
        update_exact_attention(*sums, q, k, v, old_keys, old_values, index)
        numerator, denominator, _ = sums
        output = numerator / denominator.unsqueeze(-1)
        expected = dense_attention(q, k, v)
    else:
        update_full_attention(*sums, q, k, v, old_keys, old_values, index)
        # Every row's attention column of the changed keys, kept key-major in the reference.
        output = sums[1][:, index].transpose(1, 2)
        expected = torch.softmax(q @ k.transpose(1, 2), dim=-1)[:, :, index]
    assert torch.allclose(output, expected, rtol=1e-3, atol=1e-6)
