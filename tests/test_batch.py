"""A batch of independent streams behaves exactly like separate single-stream runs."""

import pytest
import torch

import eventful
from eventful.synthetic import moving_squares
from tests.helpers import LEVELS, tiny_vit

POLICIES = {"topk": eventful.TopK(12), "threshold": eventful.Threshold(0.8)}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("level", LEVELS)
def test_batch_of_three_streams_equals_three_single_stream_runs(policy, level):
    vit = tiny_vit(layer_scale_init=0.5)
    model = eventful.convert(vit, policy=POLICIES[policy], level=level)
    video = moving_squares(10, size=64, batch=3, seed=4)
    batched = model.stream(batch_size=3)
    singles = [model.stream(batch_size=1) for _ in range(3)]
    counts_differ = False
    for frame in video:
        output = batched(frame)
        for index, single in enumerate(singles):
            expected = single(frame[index : index + 1])
            assert torch.allclose(output[index : index + 1], expected, atol=1e-5)
            assert batched.ops.per_stream[index] == single.ops.per_stream[0]
            assert batched.ops.dense_per_stream[index] == single.ops.dense
            for block_b, block_s in zip(batched.trace.blocks, single.trace.blocks, strict=True):
                for gate in block_b:
                    assert block_b[gate].counts[index] == block_s[gate].counts[0]
        counts = batched.trace.blocks[0]["qkv"].counts
        counts_differ |= len(set(counts)) > 1
        assert batched.ops.total == sum(single.ops.total for single in singles)
    # Under a threshold each stream chose its own number of tokens at some step.
    assert counts_differ == (policy == "threshold")
