"""Op counts equal hand-derived formulas.

The configuration: 32x32 input, 16x16 patches (N = 1 + 4 = 5 tokens), D = 8, H = 2 heads,
MLP hidden M = 16, one block. Conventions: linear = rows * in * out + rows * out (bias);
matmul = output elements * inner dimension; add = one per output element.
"""

import pytest
import torch

import eventful
from eventful.core.ops import (
    dense_macs,
    eventful_block_macs,
    steady_topk_macs,
    topk_for_op_ratio,
)

N, D, H, M = 5, 8, 2, 16
QKV = N * D * 3 * D + N * 3 * D  # 960 + 120
PROJ = N * D * D + N * D  # 320 + 40
FC1 = N * D * M + N * M  # 640 + 80
FC2 = N * M * D + N * D  # 640 + 40
DENSE = {
    "linear": QKV + PROJ + FC1 + FC2,
    "attention": 2 * N * N * D,
    "adds": 2 * N * D,
    "head": 0,
}
DENSE_TOTAL = 2840 + 400 + 80

S = 2  # TopK(2): every gate re-processes 2 of the 5 tokens
LINEAR_S = S * (D * 3 * D + 3 * D) + S * (D * D + D) + S * (D * M + M) + S * (M * D + D)
GATES = 3 * (N * D + N * D)  # per gate: error subtraction and its squared norm, every token
EVENTFUL = {
    "tokenwise": {
        "linear": LINEAR_S,
        "attention": 2 * N * N * D,
        "adds": 2 * N * D,
        "gates": GATES,
        "head": 0,
    },
    # Rows and columns of the query-key product, then a dense attention-value product.
    "qk": {
        "linear": LINEAR_S,
        "attention": 2 * S * N * D + N * N * D,
        "adds": 2 * N * D,
        "gates": GATES,
        "head": 0,
    },
    # With 3 S >= N the full level takes every row's log-sum-exp from all logits (N^2 D); then
    # A[:, S] dV and dA V_old; deltas dV (S x D) and dA (H x N x S); two accumulations into the
    # cached product (N x D each).
    "full": {
        "linear": LINEAR_S,
        "attention": N * N * D + 2 * N * S * D,
        "adds": 2 * N * D + 2 * N * D,
        "gates": GATES + S * D + H * N * S,
        "head": 0,
    },
    # With 3 S >= N the exact level recomputes every row (2 N^2 D), cheaper than its update.
    "exact": {
        "linear": LINEAR_S,
        "attention": 2 * N * N * D,
        "adds": 2 * N * D,
        "gates": GATES,
        "head": 0,
    },
}


def small_model(level: str) -> eventful.EventfulViT:
    torch.manual_seed(0)
    vit = eventful.ViT(image_size=32, patch_size=16, dim=D, depth=1, heads=H, mlp_ratio=2.0)
    return eventful.convert(vit.eval(), policy=eventful.TopK(S), level=level)


@pytest.mark.parametrize("selected", [1, 2])
@pytest.mark.parametrize("level", ["tokenwise", "qk", "full", "exact"])
def test_a_dense_and_an_incremental_step_count_what_the_shapes_give_by_hand(level, selected):
    # Derived here from the shapes alone, by the conventions of eventful.core.ops: a 32 x 32
    # input cut into 16 x 16 patches gives 4 tokens and the class token; the layers map
    # (in, out) features as below, each with a bias.
    n, s = 1 + (32 // 16) ** 2, selected
    layers = [(D, 3 * D), (D, D), (D, M), (M, D)]  # qkv, proj, fc1, fc2

    def linear(rows):
        return sum(rows * inputs * outputs + rows * outputs for inputs, outputs in layers)

    model = small_model(level)
    model.policy = eventful.TopK(s)
    stream = model.stream(drift=None)
    frames = torch.randn(2, 1, 3, 32, 32)

    # Dense step: every row through every layer, q k^T and A v over n x n (2 n^2 D), two
    # residual adds (2 n D), no gate error.
    stream(frames[0])
    dense = {
        "linear": linear(n),
        "attention": 2 * n * n * D,
        "adds": 2 * n * D,
        "gates": 0,
        "head": 0,
    }
    assert stream.ops.by_category == dense
    assert stream.ops.total == stream.ops.dense == sum(dense.values())

    # Incremental step: s rows through the layers; each of the 3 gates takes an error and its
    # norm for every token (2 n D). The attention depends on the level; the full level updates
    # running sums below n / 3 selected tokens (s = 1) and recomputes every row's log-sum-exp
    # from n / 3 on (s = 2), plus any row whose running denominator underflowed (r); the exact
    # level recomputes every row from n / 5 on (both here; test_exact_level_incremental_...
    # counts its update).
    stream(frames[1])
    r = stream.trace.recomputed_rows[0][0]
    adds, gates = 2 * n * D, 3 * 2 * n * D
    if level == "tokenwise":
        attention = 2 * n * n * D
    elif level == "qk":
        attention = 2 * s * n * D + n * n * D  # new rows and columns of q k^T, then A v
    elif level == "exact" and 5 * s >= n:
        attention = 2 * n * n * D
    elif level == "exact":
        # Old and new logits and values of the changed keys in every row (4 n s D), the
        # changed and underflowed rows over all keys (2 n D each); rescale the running
        # numerator (n x D) and denominator (H x n), and two accumulations into each.
        attention = 4 * n * s * D + 2 * (s + r) * n * D
        adds += 3 * n * D + 3 * n * H
    else:
        # Full: the new logits of the changed keys' columns, each row's log-sum-exp (from
        # all logits, or kept as running sums: old logits, changed and underflowed rows),
        # then A[:, S] dV and dA V_old (2 n s D); the deltas dV (s x D) and dA (H x n x s);
        # two accumulations into the cached product (2 n D).
        if 3 * s >= n:
            attention = n * n * D + 2 * n * s * D
        else:
            attention = 2 * n * s * D + (s + r) * n * D + 2 * n * s * D
            adds += 3 * n * H
        adds += 2 * n * D
        gates += s * D + H * n * s
    incremental = {
        "linear": linear(s),
        "attention": attention,
        "adds": adds,
        "gates": gates,
        "head": 0,
    }
    assert stream.ops.by_category == incremental
    assert stream.ops.dense == sum(dense.values())


@pytest.mark.parametrize("level", ["tokenwise", "qk", "full", "exact"])
def test_dense_and_eventful_counts_equal_hand_derived_formulas(level):
    stream = small_model(level).stream(batch_size=2, drift=None)
    frames = torch.randn(3, 2, 3, 32, 32)
    stream(frames[0])
    assert stream.ops.dense == 2 * DENSE_TOTAL
    assert stream.ops.by_category == {**{k: 2 * v for k, v in DENSE.items()}, "gates": 0}
    assert stream.ops.total == stream.ops.dense
    for frame in frames[1:]:
        stream(frame)
        assert stream.ops.per_stream == [EVENTFUL[level], EVENTFUL[level]]
        assert stream.ops.by_category == {k: 2 * v for k, v in EVENTFUL[level].items()}
        assert stream.ops.total == 2 * sum(EVENTFUL[level].values())
        assert stream.ops.dense == 2 * DENSE_TOTAL


def test_counts_scale_with_depth_and_threshold_counts_per_stream():
    torch.manual_seed(0)
    vit = eventful.ViT(image_size=32, patch_size=16, dim=D, depth=3, heads=H, mlp_ratio=2.0)
    stream = eventful.convert(vit.eval(), policy=eventful.Threshold(0.0), level="qk").stream(
        drift=None
    )
    stream(torch.randn(1, 3, 32, 32))
    stream(torch.randn(1, 3, 32, 32))
    # Threshold 0 selects all N tokens at every gate of all 3 blocks.
    all_tokens = {
        "linear": DENSE["linear"],
        "attention": 2 * N * N * D + N * N * D,
        "adds": 2 * N * D,
        "gates": GATES,
        "head": 0,
    }
    assert stream.ops.by_category == {k: 3 * v for k, v in all_tokens.items()}
    assert stream.ops.dense == 3 * DENSE_TOTAL


def test_counting_off_records_nothing():
    stream = small_model("full").stream(count_ops=False, drift=None)
    stream(torch.randn(1, 3, 32, 32))
    assert stream.ops is None and stream.trace is None


def test_topk_for_op_ratio_picks_the_largest_k_within_the_budget():
    model = small_model("full")
    blocks = model.encoder.blocks
    k = topk_for_op_ratio(blocks, N, 1.5)
    dense = dense_macs(blocks, N)
    assert steady_topk_macs(blocks, N, k) * 1.5 <= dense
    assert k == N or steady_topk_macs(blocks, N, k + 1) * 1.5 > dense
    # Averaged over 4 frames, the dense first frame leaves less for the other three.
    assert topk_for_op_ratio(blocks, N, 1.5, frames=4) <= k
    # The steady cost equals what a stream counts for TopK(k) after its first frame.
    model.policy = eventful.TopK(k)
    stream = model.stream(drift=None)
    stream(torch.randn(1, 3, 32, 32))
    stream(torch.randn(1, 3, 32, 32))
    assert stream.ops.total == steady_topk_macs(blocks, N, k)


def test_unreachable_op_ratio_is_an_error():
    blocks = small_model("full").encoder.blocks
    with pytest.raises(ValueError, match="op ratio of 1000 is out of reach"):
        topk_for_op_ratio(blocks, N, 1000)
    with pytest.raises(ValueError, match="cannot be reached in 2 frames"):
        topk_for_op_ratio(blocks, N, 2, frames=2)


def test_exact_level_incremental_counts_equal_hand_derived_formulas():
    model = small_model("exact")
    model.policy = eventful.TopK(1)
    stream = model.stream(drift=None)
    # 48 x 48: 9 patches and the class token, n = 10 > 5 s: the incremental update.
    stream(torch.randn(1, 3, 48, 48))
    stream(torch.randn(1, 3, 48, 48))
    s, n = 1, 10
    gates = 3 * (n * D + n * D)
    linear = s * (D * 3 * D + 3 * D) + s * (D * D + D) + s * (D * M + M) + s * (M * D + D)
    # Every row swaps old for new contributions of the changed key (logits and values, old and
    # new: 4 n s D); the changed query's row is recomputed (2 s n D). Running sums: rescale U
    # (n x D) and Z (H x n), and two accumulations into each.
    assert stream.ops.by_category == {
        "linear": linear,
        "attention": 4 * n * s * D + 2 * s * n * D,
        "adds": 2 * n * D + 3 * n * D + 3 * n * H,
        "gates": gates,
        "head": 0,
    }


def test_full_level_below_a_third_of_the_tokens_counts_its_running_sums():
    # N = 17 tokens, S = 2 < N / 3: new and old logits of the changed keys (2 N S D), the
    # changed rows (S N D) and 3 underflowed rows (3 N D) over all keys, then A[:, S] dV and
    # dA V_old (2 N S D); running sums (rescale, add, subtract: 3 N H) on top of the two
    # accumulations into the cached product.
    block = small_model("full").encoder.blocks[0]
    tokens, selected, underflowed = 17, 2, 3
    counts = dict.fromkeys(("qkv", "proj", "mlp"), selected)
    macs = eventful_block_macs(block, tokens, counts, False, True, underflowed)
    assert macs["attention"] == (
        2 * tokens * selected * D
        + (selected + underflowed) * tokens * D
        + 2 * tokens * selected * D
    )
    assert macs["adds"] == 2 * tokens * D + 3 * tokens * H + 2 * tokens * D
