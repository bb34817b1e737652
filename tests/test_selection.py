"""Gates select exactly the tokens whose input changed."""

import pytest
import torch

import eventful
from tests.helpers import LEVELS, tiny_vit


@pytest.mark.parametrize("level", LEVELS)
def test_identical_frame_updates_no_token_under_a_threshold(level, video):
    vit = tiny_vit()
    stream = eventful.convert(vit, policy=eventful.Threshold(1e-3), level=level).stream()
    first = stream(video[0])
    again = stream(video[0].clone())
    for selections in stream.trace.blocks:
        assert all(selection.counts == [0] for selection in selections.values())
    assert torch.equal(first, again)
    assert stream.ops.by_category["linear"] == 0


def test_change_confined_to_one_region_selects_exactly_its_tokens_in_the_first_block(video):
    vit = tiny_vit()
    stream = eventful.convert(vit, policy=eventful.Threshold(1e-3), level="full").stream()
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
    stream = eventful.convert(vit, policy=eventful.TopK(2), level="full").stream()
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
    stream = eventful.convert(vit, policy=eventful.Threshold(0.5), level="tokenwise").stream()
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
