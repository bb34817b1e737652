"""A batch of independent streams behaves like separate single-stream runs: the same selections
and op counts, and outputs equal up to rounding (the batch's matmuls run on other row counts
than a single stream's; tests/helpers.py)."""

import pytest
import torch

import eventful
from eventful.synthetic import moving_squares
from tests.helpers import (
    LEVELS,
    SELECTION_MARGIN,
    MarginRecorder,
    assert_equal_up_to_rounding,
    tiny_vit,
)

POLICIES = {"topk": eventful.TopK(12), "threshold": eventful.Threshold(0.8)}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("level", LEVELS)
def test_batch_of_three_streams_equals_three_single_stream_runs(policy, level):
    vit = tiny_vit(layer_scale_init=0.5)
    recorder = MarginRecorder(POLICIES[policy])
    model = eventful.convert(vit, policy=recorder, level=level)
    # Seed 19: no selection of the batch's run is near a tie, so rounding cannot swap a token.
    video = moving_squares(10, size=64, batch=3, seed=19)
    batched = model.stream(batch_size=3)
    steps = []
    for frame in video:
        output = batched(frame)
        steps.append((output, batched.ops, batched.trace))
    assert recorder.margin > SELECTION_MARGIN
    singles = [model.stream(batch_size=1) for _ in range(3)]
    counts_differ = False
    for frame, (output, ops, trace) in zip(video, steps, strict=True):
        for index, single in enumerate(singles):
            expected = single(frame[index : index + 1])
            assert_equal_up_to_rounding(output[index : index + 1], expected)
            assert ops.per_stream[index] == single.ops.per_stream[0]
            assert ops.dense_per_stream[index] == single.ops.dense
            for block_b, block_s in zip(trace.blocks, single.trace.blocks, strict=True):
                for gate in block_b:
                    chosen = block_b[gate].per_stream[index].sort().values
                    assert torch.equal(chosen, block_s[gate].per_stream[0].sort().values)
        counts = trace.blocks[0]["qkv"].counts
        counts_differ |= len(set(counts)) > 1
        assert ops.total == sum(single.ops.total for single in singles)
    # Under a threshold each stream chose its own number of tokens at some step.
    assert counts_differ == (policy == "threshold")
