"""A scanning camera: TORE's extractor per tile view, the aggregator eventful over revisits."""

import pytest
import torch

from eventful import TopFraction
from eventful.methods.iared2 import block_macs
from eventful.methods.tore_scan import ScanSession
from eventful.synthetic import moving_squares
from tests.helpers import assert_equal_up_to_rounding, tiny_vit

TILES = [(0, 0), (0, 4), (4, 0), (4, 4)]  # 4 x 4 patches each of the 8 x 8 grid


def scene(steps: int, batch: int = 1, seed: int = 3) -> torch.Tensor:
    return moving_squares(steps, size=64, batch=batch, seed=seed)


def view(frame: torch.Tensor, at: tuple[int, int]) -> torch.Tensor:
    top, left = at[0] * 8, at[1] * 8
    return frame[..., top : top + 32, left : left + 32]


def scan(session: ScanSession, video: torch.Tensor, first: int = 0) -> list:
    """Visit tile t % 4 at time step t (from `first`), predicting after each visit."""
    predictions = []
    for step, frame in enumerate(video, start=first):
        at = TILES[step % len(TILES)]
        session.visit(view(frame, at), at)
        predictions.append(session.predict())
    return predictions


def test_with_every_token_selected_the_eventful_aggregator_is_recycling_alone():
    vit = tiny_vit(num_registers=1)
    video = scene(10)
    every = ScanSession(vit, 1, 64, 64, (4, 4), policy=TopFraction(1.0))
    alone = ScanSession(vit, 1, 64, 64, (4, 4))
    for got, want in zip(scan(every, video), scan(alone, video), strict=True):
        assert torch.equal(got.ids, want.ids)
        assert_equal_up_to_rounding(got.tokens, want.tokens)


def test_split_zero_is_the_full_model_on_the_latest_views():
    vit = tiny_vit()
    video = scene(6)
    session = ScanSession(vit, 0, 64, 64, (4, 4))
    canvas = torch.zeros_like(video[0])
    for step, frame in enumerate(video):
        at = TILES[step % 4]
        session.visit(view(frame, at), at)
        view(canvas, at).copy_(view(frame, at))
    prediction = session.predict()
    with torch.no_grad():
        want = vit(canvas)
    assert_equal_up_to_rounding(prediction.tokens[:, 0], want[:, 0])
    assert_equal_up_to_rounding(prediction.tokens[:, 1:], want[:, 1:][:, prediction.ids[0]])


def test_a_revisit_reprocesses_little_in_the_aggregator():
    vit = tiny_vit()
    video = scene(9)
    session = ScanSession(vit, 1, 64, 64, (4, 4), policy=TopFraction(0.25))
    scan(session, video[:3])
    aggregator = session.recycler.blocks[1:]
    dense = sum(block_macs(block, 1 + 48) for block in aggregator)
    assert session.ops == dense and session.stream.steps == 0  # tiles still arriving
    scan(session, video[3:4], first=3)  # every tile seen: the stream's first step, dense
    dense = sum(block_macs(block, 65) for block in aggregator)
    assert session.stream.steps == 1 and session.stream.ops.dense == dense
    assert session.ops >= dense
    session.visit(view(video[4], TILES[0]), TILES[0])
    session.predict()
    assert session.ops < 0.6 * dense
    assert session.recompute_ops == sum(block_macs(block, 65) for block in session.recycler.blocks)


def test_a_batch_of_scans_equals_each_scan_alone():
    vit = tiny_vit()
    video = scene(7, batch=2)
    batched = scan(ScanSession(vit, 1, 64, 64, (4, 4), TopFraction(0.3), batch_size=2), video)
    for stream in range(2):
        alone = scan(
            ScanSession(vit, 1, 64, 64, (4, 4), TopFraction(0.3)), video[:, stream : stream + 1]
        )
        for got, want in zip(batched, alone, strict=True):
            assert_equal_up_to_rounding(got.tokens[stream : stream + 1], want.tokens)


def test_bad_input_is_refused_and_leaves_the_session_unchanged():
    vit = tiny_vit()
    frame = scene(1)[0]
    with pytest.raises(ValueError, match="do not cut the 8x8 patch grid evenly"):
        ScanSession(vit, 1, 64, 64, (3, 4))
    with pytest.raises(ValueError, match="whole patches of 8 pixels"):
        ScanSession(vit, 1, 60, 64, (4, 4))
    with pytest.raises(ValueError, match="needs a split before the last block"):
        ScanSession(vit, 3, 64, 64, (4, 4), policy=TopFraction(0.5))
    session = ScanSession(vit, 1, 64, 64, (4, 4), policy=TopFraction(0.5))
    with pytest.raises(ValueError, match="at least one visit"):
        session.predict()
    session.visit(view(frame, (0, 0)), (0, 0))
    before = {place: [t.clone() for t in parts] for place, parts in session.views.items()}
    with pytest.raises(ValueError, match=r"expected a tile view \(1, C, 32, 32\)"):
        session.visit(frame[..., :32, :24], (0, 4))
    with pytest.raises(ValueError, match="multiple of the 4x4 tile"):
        session.visit(view(frame, (0, 0)), (2, 0))
    with pytest.raises(ValueError, match="leaves the 8x8 grid"):
        session.visit(view(frame, (0, 0)), (8, 0))
    assert set(session.views) == set(before)
    for place, parts in session.views.items():
        assert all(torch.equal(a, b) for a, b in zip(parts, before[place], strict=True))
