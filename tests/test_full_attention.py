"""The full level computes the paper's update without an N x N softmax or query-key cache.

The oracle below is the paper's formulation written out plainly: every step, the whole
softmax A over the buffered q, k; then product += A[:, S] dV + (A[:, S] - A_ref[:, S]) V_old
and A_ref[:, S] = A[:, S]. The engine must follow it step for step.
"""

import pytest
import torch

from eventful.core.attention import recompute_full_attention, update_full_attention

HEADS, TOKENS, WIDTH = 2, 30, 8


class PaperFullLevel:
    """The oracle: the paper's full-level update, with the full softmax every step."""

    def __init__(self, q, k, v):
        attention = torch.softmax(q @ k.transpose(1, 2), dim=-1)
        self.reference = attention.clone()
        self.product = attention @ v

    def step(self, q, k, v, old_values, index):
        attention = torch.softmax(q @ k.transpose(1, 2), dim=-1)
        columns = attention[:, :, index]
        delta = columns - self.reference[:, :, index]
        self.reference[:, :, index] = columns
        self.product += columns @ (v[:, index] - old_values) + delta @ old_values


def engine_state(q, k, v):
    product = torch.empty(HEADS, TOKENS, WIDTH)
    reference = torch.empty(HEADS, TOKENS, TOKENS)
    denominator = torch.empty(HEADS, TOKENS)
    shift = torch.empty(HEADS, TOKENS)
    recompute_full_attention(product, reference, denominator, shift, q, k, v)
    return product, reference, denominator, shift


@pytest.mark.parametrize("selected", [3, 9, 10, 30])  # below N / 3, at it, and every token
def test_full_level_update_follows_the_paper_step_for_step(selected):
    generator = torch.Generator().manual_seed(selected)
    q, k, v = (torch.randn(HEADS, TOKENS, WIDTH, generator=generator) for _ in range(3))
    oracle = PaperFullLevel(q, k, v)
    state = engine_state(q, k, v)
    for _ in range(6):
        index = torch.randperm(TOKENS, generator=generator)[:selected]
        old_keys, old_values = k[:, index].clone(), v[:, index].clone()
        for tensor in (q, k, v):
            tensor[:, index] += 0.5 * torch.randn(HEADS, selected, WIDTH, generator=generator)
        oracle.step(q, k, v, old_values, index)
        update_full_attention(*state, q, k, v, old_keys, old_values, index)
        assert torch.allclose(state[0], oracle.product, atol=1e-5)
        # The reference, stored key-major, holds the oracle's columns.
        assert torch.allclose(state[1].transpose(1, 2), oracle.reference, atol=1e-6)


def test_full_level_recomputes_rows_whose_running_sum_underflowed():
    # Sharp attention: every query attends almost only to key 0. When key 0 moves far away,
    # the rows' running sums fall below the underflow bound and must be recomputed.
    q = torch.zeros(HEADS, TOKENS, WIDTH)
    q[..., 0] = 10.0
    k = torch.randn(HEADS, TOKENS, WIDTH, generator=torch.Generator().manual_seed(1))
    k[:, 0, 0] = 10.0
    v = torch.randn(HEADS, TOKENS, WIDTH, generator=torch.Generator().manual_seed(2))
    oracle = PaperFullLevel(q, k, v)
    state = engine_state(q, k, v)
    index = torch.tensor([0, 5])
    old_keys, old_values = k[:, index].clone(), v[:, index].clone()
    k[:, 0, 0] = -10.0
    oracle.step(q, k, v, old_values, index)
    recomputed = update_full_attention(*state, q, k, v, old_keys, old_values, index)
    assert recomputed == TOKENS - len(index)
    assert torch.allclose(state[0], oracle.product, atol=1e-5)
