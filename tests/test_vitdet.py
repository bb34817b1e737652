"""ViTDet on the engine: windows padded to whole windows, decomposed relative position, global
blocks; all tokens equals dense; dense op counts of ViTDet-B as the paper's conventions give."""

from functools import partial

import pytest
import torch

import eventful
from eventful.core.attention import (
    query_key_product,
    recompute_attention_rows,
    recompute_full_attention,
    update_exact_attention,
    update_full_attention,
    update_query_key_product,
)
from eventful.core.bias import DecomposedRelativePosition, relative_table
from eventful.core.ops import dense_macs
from eventful.core.partition import Windows, from_windows, to_windows
from eventful.models.vitdet import evenly_spaced_global_blocks, vitdet_from_vit
from eventful.synthetic import moving_squares
from tests.helpers import LEVELS, tiny_vit

TOLERANCE = 1e-4


def tiny_vitdet(seed: int = 0) -> eventful.ViTDet:
    """8x8 patches of 8 pixels at 64x64; windows of 3 (the grid pads to 9x9); block 1 global."""
    torch.manual_seed(seed)
    model = eventful.ViTDet(
        image_size=64,
        patch_size=8,
        dim=32,
        depth=3,
        heads=4,
        window=3,
        global_blocks=(1,),
        pretrain_size=48,
    )
    return model.eval()


def video(steps: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(steps, 2, 3, height, width).cumsum(0) * 0.3


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("policy", [eventful.TopK(8 * 8), eventful.Threshold(0.0)])
@pytest.mark.parametrize("size", [(64, 64), (40, 72), (24, 48)])  # (24, 48): no padding
def test_all_tokens_equal_the_dense_vitdet_on_every_frame(level, policy, size):
    dense = tiny_vitdet()
    if isinstance(policy, eventful.TopK):
        policy = eventful.TopK(dense.embedding.num_tokens(*size))
    stream = eventful.convert(dense, policy=policy, level=level).stream(batch_size=2)
    with torch.no_grad():
        for frame in video(5, *size):
            output = stream(frame)
            assert output.shape == (2, 32, size[0] // 8, size[1] // 8)
            torch.testing.assert_close(output, dense(frame), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("level", LEVELS)
def test_threshold_zero_equals_dense_when_most_patches_stay_still(level):
    # Still patches are never selected: the windows' padding must stay consistent around them.
    dense = tiny_vitdet()
    converted = eventful.convert(dense, policy=eventful.Threshold(0.0), level=level)
    stream = converted.stream(batch_size=2, drift=None)
    with torch.no_grad():
        for frame in moving_squares(5, size=64, batch=2, seed=5):
            torch.testing.assert_close(stream(frame), dense(frame), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("level", LEVELS)
def test_few_tokens_save_ops_and_stay_near_dense(level):
    dense = tiny_vitdet()
    converted = eventful.convert(dense, policy=eventful.TopK(16), level=level)
    stream = converted.stream(drift=None)  # no refresh steps: every step after the first is sparse
    frames = video(6, 64, 64)[:, :1]
    with torch.no_grad():
        for frame in frames:
            output = stream(frame)
        cosine = torch.nn.functional.cosine_similarity(output.flatten(), dense(frame).flatten(), 0)
    assert stream.ops.total < stream.ops.dense
    assert cosine > 0.9


@pytest.mark.parametrize("level", LEVELS)
def test_the_first_step_counts_exactly_the_dense_ops(level):
    dense = tiny_vitdet()
    converted = eventful.convert(dense, policy=eventful.TopK(4), level=level)
    stream = converted.stream()
    stream(video(1, 40, 72)[0, :1])
    assert stream.ops.total == stream.ops.dense
    assert stream.ops.dense == dense_macs(converted.encoder.blocks, 5 * 9, (5, 9))


@pytest.mark.parametrize(("size", "giga_macs"), [(672, 174.5), (1024, 467.4)])
def test_vitdet_b_dense_op_counts_match_the_papers_conventions(size, giga_macs):
    # RESOURCES.md: linear layers cost inputs x outputs plus a bias add, matmuls outputs x inner
    # dimension, adds one per output; the padding of windows is not projected.
    model = eventful.ViTDet(image_size=size)
    converted = eventful.convert(model, policy=eventful.TopK(1), level="tokenwise")
    grid = (size // 16, size // 16)
    macs = dense_macs(converted.encoder.blocks, grid[0] * grid[1], grid)
    assert round(macs / 1e9, 1) == giga_macs


def test_an_input_smaller_than_one_window_is_refused_before_any_cache_is_touched():
    stream = eventful.convert(tiny_vitdet(), policy=eventful.TopK(4), level="tokenwise").stream()
    with pytest.raises(ValueError, match="2x8 patch grid, smaller than one 3x3 attention window"):
        stream(torch.randn(1, 3, 16, 64))
    assert not stream.state.allocated


def test_a_window_size_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="window size must be a positive integer, got 0"):
        Windows(0)


def test_windows_round_trip_and_pad_to_whole_windows():
    windows = Windows(3)
    assert windows.padded_grid(5, 9) == (6, 9) and windows.count(5, 9) == 6
    grid = torch.arange(2 * 6 * 9 * 4, dtype=torch.float32).view(2, 6, 9, 4)
    grouped = to_windows(grid, 3)
    assert grouped.shape == (2 * 6, 9, 4)
    assert torch.equal(grouped[1, 4], grid[0, 1, 4 + 0])  # window (0, 1), row 1, column 1
    assert torch.equal(from_windows(grouped, 2, 6, 9, 3), grid)


def test_relative_table_indexes_each_offset():
    table = torch.randn(2 * 4 - 1, 5)
    picked = relative_table(4, 4, table)
    for query in range(4):
        for key in range(4):
            assert torch.equal(picked[query, key], table[query - key + 3])


def test_decomposed_relative_position_equals_its_definition():
    torch.manual_seed(0)
    bias = DecomposedRelativePosition(torch.randn(5, 6), torch.randn(7, 6))
    q = torch.randn(2, 3 * 4, 6)
    got = bias(q, (3, 4))
    for query in range(12):
        i, j = divmod(query, 4)
        for key in range(12):
            k, m = divmod(key, 4)
            expected = q[:, query] @ bias.rows[i - k + 2] + q[:, query] @ bias.cols[j - m + 3]
            torch.testing.assert_close(got[:, query, key], expected)


def test_a_relative_position_table_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"got \(5, 6\) and \(7, 4\)"):
        DecomposedRelativePosition(torch.randn(5, 6), torch.randn(7, 4))


def test_exact_updates_with_the_bias_equal_a_dense_recompute():
    """Rows and columns touched by an update take exactly their relative position bias."""
    torch.manual_seed(0)
    heads, rows, cols, head_dim = 2, 3, 4, 5
    length = rows * cols
    bias = DecomposedRelativePosition(torch.randn(2 * rows - 1, head_dim), torch.randn(7, head_dim))
    q, k, v = (torch.randn(heads, length, head_dim) for _ in range(3))

    def bias_of(queries):  # of one group
        return partial(bias.between, queries.unsqueeze(0), (rows, cols))

    sums = (
        torch.empty(heads, length, head_dim),
        torch.empty(heads, length),
        torch.empty(heads, length),
    )
    recompute_attention_rows(*sums, q, k, v, torch.arange(length), bias_of(q))
    index = torch.tensor([1, 10])  # 2 of 12 tokens: below the recompute (N / 5)
    old_keys, old_values = k[:, index].clone(), v[:, index].clone()
    for part in (q, k, v):
        part[:, index] += torch.randn(heads, 2, head_dim)
    update_exact_attention(*sums, q, k, v, old_keys, old_values, index, bias_of(q))
    logits = q @ k.transpose(1, 2) + bias(q, (rows, cols))
    expected = logits.softmax(-1) @ v
    torch.testing.assert_close(sums[0] / sums[1].unsqueeze(-1), expected, rtol=1e-5, atol=1e-5)


def test_the_bias_between_rows_and_columns_is_the_full_bias_cut_to_them():
    torch.manual_seed(1)
    bias = DecomposedRelativePosition(torch.randn(5, 4), torch.randn(9, 4))
    q = torch.randn(2, 3, 3 * 5, 4)  # 2 groups, 3 heads
    rows = torch.tensor([[0, 7, 14], [1, 2, 3]])
    cols = torch.tensor([[2, 3, 11, 12], [0, 1, 13, 14]])
    full = bias(q, (3, 5))
    for group in range(2):
        cut = full[group][:, rows[group]][:, :, cols[group]]
        torch.testing.assert_close(bias.between(q, (3, 5), rows, cols)[group], cut)
        torch.testing.assert_close(
            bias.between(q, (3, 5), None, cols)[group], full[group][:, :, cols[group]]
        )
        torch.testing.assert_close(
            bias.between(q, (3, 5), rows, None)[group], full[group][:, rows[group]]
        )


def test_a_vitdet_style_backbone_from_a_vit_keeps_its_patch_embedding_and_reduces_to_dense():
    vit = tiny_vit(layer_scale_init=0.5)
    backbone = vitdet_from_vit(vit, window=3, global_blocks=(1,))
    frames = video(4, 40, 72)
    with torch.no_grad():
        # Same patches and positions, without the class token.
        torch.testing.assert_close(backbone.embedding(frames[0]), vit.embedding(frames[0])[:, 1:])
        for level in LEVELS:
            policy = eventful.TopK(5 * 9)
            stream = eventful.convert(backbone, policy=policy, level=level).stream(batch_size=2)
            for frame in frames:
                torch.testing.assert_close(
                    stream(frame), backbone(frame), rtol=TOLERANCE, atol=TOLERANCE
                )


def test_global_blocks_are_placed_as_vitdet_places_them():
    assert evenly_spaced_global_blocks(12) == (2, 5, 8, 11)
    assert evenly_spaced_global_blocks(24) == (5, 11, 17, 23)
    with pytest.raises(ValueError, match="cannot split 10 blocks into 4 equal stages"):
        evenly_spaced_global_blocks(10)


def biased_update_case(seed: int = 0):
    """A 3 x 4 grid of tokens with a relative position bias, and an update of 3 of them."""
    torch.manual_seed(seed)
    heads, rows, cols, head_dim = 2, 3, 4, 5
    bias = DecomposedRelativePosition(torch.randn(2 * rows - 1, head_dim), torch.randn(7, head_dim))
    q, k, v = (torch.randn(heads, rows * cols, head_dim) for _ in range(3))
    index = torch.tensor([1, 6, 10])
    return bias, (rows, cols), q, k, v, index


def change(q, k, v, index):
    old_keys, old_values = k[:, index].clone(), v[:, index].clone()
    for part in (q, k, v):
        part[:, index] += torch.randn(part.shape[0], index.numel(), part.shape[-1])
    return old_keys, old_values


def test_query_key_updates_with_the_bias_equal_a_dense_recompute():
    bias, grid, q, k, v, index = biased_update_case(1)
    logits = query_key_product(q, k, bias(q, grid))
    change(q, k, v, index)
    update_query_key_product(logits, q, k, index, partial(bias.between, q.unsqueeze(0), grid))
    torch.testing.assert_close(logits, query_key_product(q, k, bias(q, grid)))


def test_full_level_running_sums_with_the_bias_equal_each_rows_log_sum_exp():
    bias, grid, q, k, v, index = biased_update_case(2)
    heads, length, head_dim = q.shape
    product, reference = torch.empty(heads, length, head_dim), torch.empty(heads, length, length)
    denominator, shift = torch.empty(heads, length), torch.empty(heads, length)
    caches = (product, reference, denominator, shift)
    recompute_full_attention(*caches, q, k, v, bias(q, grid))
    old_keys, old_values = change(q, k, v, index)
    update_full_attention(
        *caches, q, k, v, old_keys, old_values, index, partial(bias.between, q.unsqueeze(0), grid)
    )
    logits = query_key_product(q, k, bias(q, grid))
    torch.testing.assert_close(shift + denominator.log(), logits.logsumexp(-1))
    # The changed keys' attention columns are current: the reference holds them key-major.
    columns = (logits - logits.logsumexp(-1, keepdim=True)).exp()[:, :, index]
    torch.testing.assert_close(reference[:, index], columns.transpose(1, 2))
