"""The full level's update in one CPU kernel call (`kernels.full_attention_update`) against the
same update in PyTorch operators (`attention.update_full_groups`), on its own and in a stream;
and its bad input.

The two keep each row's log-sum-exp as a shift and a denominator, but raise the shift to
different values (the kernel as the exact level's swap does), so their states are compared
through the log-sum-exp, shift + log(denominator), which both must get right."""

import pytest
import torch

import eventful
from eventful.core import attention, kernels
from eventful.synthetic import moving_squares
from tests.helpers import kernel_calls, two_streams_over

needs_full_kernel = pytest.mark.skipif(
    kernels.full_attention_update() is None, reason="the CPU kernels could not be built here"
)


def full_state(groups, heads, length, dh, count, padding, seed=0):
    """The full level's caches after a dense step over random q, k, v (views of a qkv buffer,
    as a block holds them), then `count` positions of each group changed; with `padding`, group
    0's last half of positions are padding (valid false, nothing changed there)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator)

    qkv = normal(groups, length, 3, heads, dh)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    q.div_(3)
    caches = [
        torch.zeros(groups, heads, length, dh),
        torch.zeros(groups, heads, length, length),
        torch.zeros(groups, heads, length),
        torch.zeros(groups, heads, length),
    ]
    attention.recompute_full_attention(*caches, q, k, v)
    positions = [torch.randperm(length, generator=generator)[:count] for _ in range(groups)]
    index = torch.stack(positions)
    valid = torch.ones(groups, count, dtype=torch.bool)
    if padding:
        valid[0, count // 2 :] = False
    at = index.view(groups, 1, count, 1).expand(groups, heads, count, dh)
    old_keys, old_values = k.gather(2, at).clone(), v.gather(2, at).clone()
    changed = valid.view(groups, 1, count, 1).expand(groups, heads, count, dh)
    for x, old in ((q, q.gather(2, at)), (k, old_keys), (v, old_values)):
        x.scatter_(2, at, torch.where(changed, normal(groups, heads, count, dh), old))
    return caches, (q, k, v, old_keys, old_values), attention.Changes(index, valid)


def pytorch_update(caches, inputs, changes, every_row=False):
    with kernel_calls("full_attention_update", use=False):
        return attention.update_full_groups(*caches, *inputs, changes, every_row=every_row)


def by_logsumexp(caches):
    product, reference, denominator, shift = caches
    return product, reference, shift + denominator.log()


@needs_full_kernel
@pytest.mark.parametrize("every_row", [False, True])
@pytest.mark.parametrize(
    "groups, heads, length, dh, count, padding",
    [
        (1, 12, 197, 64, 48, False),
        (1, 6, 257, 64, 16, False),
        (3, 2, 50, 20, 5, True),
        (2, 4, 33, 7, 11, True),
        (1, 1, 9, 8, 2, False),
    ],
)
def test_the_kernel_equals_the_pytorch_operators(
    groups, heads, length, dh, count, padding, every_row
):
    caches, inputs, changes = full_state(groups, heads, length, dh, count, padding)
    ours, theirs = [c.clone() for c in caches], [c.clone() for c in caches]
    before = [x.clone() for x in inputs]
    our_lost = attention.update_full_groups(*ours, *inputs, changes, every_row=every_row)
    their_lost = pytorch_update(theirs, inputs, changes, every_row)
    assert torch.equal(our_lost, their_lost)
    for got, want in zip(by_logsumexp(ours), by_logsumexp(theirs), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    assert all(torch.equal(x, y) for x, y in zip(inputs, before, strict=True))  # read only


def zero_bias(rows, columns):
    """A bias of zeros for one group of 2 heads and 20 positions (`attention.BiasFor`)."""
    sides = [20 if side is None else side.shape[1] for side in (rows, columns)]
    return torch.zeros(1, 2, *sides)


@needs_full_kernel
def test_the_kernel_is_the_one_that_ran():
    caches, inputs, changes = full_state(1, 2, 20, 8, 3, padding=False)
    with kernel_calls("full_attention_update") as calls:
        with torch.inference_mode():
            attention.update_full_groups(*caches, *inputs, changes)
        attention.update_full_groups(*caches, *inputs, changes, every_row=True)
        attention.update_full_groups(*caches, *inputs, changes, zero_bias)  # a bias: PyTorch's
    assert len(calls) == 2  # not with a bias


@needs_full_kernel
def test_the_kernel_recomputes_rows_that_underflowed():
    # Key 0 dominates every row, then drops: every other row's denominator collapses.
    q, k = torch.ones(1, 1, 6, 2), torch.zeros(1, 1, 6, 2)
    k[0, 0, 0] = 40.0
    v = torch.arange(12.0).reshape(1, 1, 6, 2)
    caches = [torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6, 6)]
    caches += [torch.zeros(1, 1, 6), torch.zeros(1, 1, 6)]
    attention.recompute_full_attention(*caches, q, k, v)
    old_keys, old_values = k[:, :, :1].clone(), v[:, :, :1].clone()
    k[0, 0, 0] = -40.0
    changes = attention.Changes(torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.bool))
    ours, theirs = [c.clone() for c in caches], [c.clone() for c in caches]
    lost = attention.update_full_groups(*ours, q, k, v, old_keys, old_values, changes)
    their_lost = pytorch_update(theirs, (q, k, v, old_keys, old_values), changes)
    assert lost.tolist() == their_lost.tolist() == [5]  # rows 1..5; row 0 is a changed query
    logsumexp = torch.logsumexp(q @ k.transpose(-1, -2), dim=-1)
    torch.testing.assert_close(by_logsumexp(ours)[2], logsumexp)
    for got, want in zip(by_logsumexp(ours), by_logsumexp(theirs), strict=True):
        torch.testing.assert_close(got, want)


@needs_full_kernel
def test_the_kernel_refuses_bad_input_and_names_it_leaving_the_state_as_it_was():
    caches, (q, k, v, old_keys, old_values), changes = full_state(2, 2, 10, 4, 3, padding=False)
    before = [c.clone() for c in caches]
    index, valid = changes.index, changes.valid
    kernel = kernels.full_attention_update()

    def call(index=index, valid=valid, old_keys=old_keys, product=caches[0]):
        changed = (old_keys, old_values, index, valid)
        return kernel(product, *caches[1:], q, k, v, *changed, 1e-3, False)

    repeated = index.clone()
    repeated[1, 2] = repeated[1, 0]
    outside = index.clone()
    outside[0, 1] = 10
    cases = [
        ({"index": outside}, r"positions in \[0, 10\), got 10 in group 0"),
        ({"index": repeated}, rf"distinct positions in a group, got {int(index[1, 0])} twice"),
        ({"index": index.int()}, r"index as a contiguous \(G, m\) int64"),
        ({"valid": valid[:, :2].contiguous()}, r"valid as a contiguous bool CPU tensor of shape"),
        ({"old_keys": old_keys[:, :, :2].contiguous()}, r"old_keys of shape \[2, 2, 3, 4\]"),
        ({"product": caches[0].double()}, r"product as a float32 CPU tensor"),
    ]
    for arguments, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**arguments)
        assert all(torch.equal(c, b) for c, b in zip(caches, before, strict=True))


def full_streams(policy, use_kernel, frames):
    """Outputs and final state of a full-level ViT's two streams over `frames`, the update in
    one kernel call or in PyTorch's operators; and the kernel's calls."""
    with kernel_calls("full_attention_update", use_kernel) as calls, torch.no_grad():
        outputs, stream = two_streams_over("full", policy, frames)
    return outputs, stream, len(calls)


@needs_full_kernel
@pytest.mark.parametrize(
    "policy", [eventful.TopK(3), eventful.Threshold(0.3)], ids=["equal counts", "ragged counts"]
)
def test_a_full_level_stream_follows_pytorchs_operators(policy):
    frames = moving_squares(10, size=48, batch=2, seed=4)
    ours, our_stream, calls = full_streams(policy, True, frames)
    theirs, their_stream, no_calls = full_streams(policy, False, frames)
    assert calls > 0 and no_calls == 0
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert our_stream.ops.total == their_stream.ops.total
