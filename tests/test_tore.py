"""TORE token recycling: pieces through the extractor once, the aggregator over all of them."""

import pytest
import torch

from eventful.methods.iared2 import block_macs
from eventful.methods.tore import Recycler
from eventful.synthetic import moving_squares
from tests.helpers import assert_equal_up_to_rounding, tiny_vit
from tests.test_hf import BUILDERS as HF_BUILDERS
from tests.test_hf import randomized

QUADRANTS = [(0, 0), (0, 4), (4, 0), (4, 4)]  # 4 x 4 patches each of the 8 x 8 grid


def image(batch: int = 1, seed: int = 2) -> torch.Tensor:
    return moving_squares(1, size=64, batch=batch, seed=seed)[0]


def crop(frame: torch.Tensor, at: tuple[int, int], patches: int = 4) -> torch.Tensor:
    top, left = at[0] * 8, at[1] * 8
    return frame[..., top : top + 8 * patches, left : left + 8 * patches]


def test_split_zero_on_every_piece_is_the_full_model():
    vit = tiny_vit()
    frame = image()
    session = Recycler(vit, split=0).session(64, 64)
    for at in QUADRANTS:
        session.add(crop(frame, at), at)
    prediction = session.predict()
    with torch.no_grad():
        want = vit(frame)
    order = prediction.ids[0]
    assert_equal_up_to_rounding(prediction.tokens[:, 0], want[:, 0])
    assert_equal_up_to_rounding(prediction.tokens[:, 1:], want[:, 1:][:, order])


def test_split_zero_on_some_pieces_is_the_full_model_on_their_union():
    vit = tiny_vit(num_registers=2)
    frame = image()
    session = Recycler(vit, split=0).session(64, 64)
    for at in QUADRANTS[:2]:
        session.add(crop(frame, at), at)
    prediction = session.predict()
    with torch.no_grad():
        tokens = vit.embedding(frame)
        union = torch.cat([tokens[:, :3], tokens[:, 3:][:, prediction.ids[0]]], dim=1)
        for block in vit.blocks:
            union = block(union)
        want = vit.norm(union)
    assert_equal_up_to_rounding(prediction.tokens, want)


def test_a_piece_is_the_same_region_cut_from_the_full_image():
    vit = tiny_vit()
    recycler = Recycler(vit, split=0)
    frame = image()
    ids = torch.tensor([[r * 8 + c for r in range(4, 8) for c in range(0, 4)]])
    with torch.no_grad():
        piece = recycler.extract(recycler.patch_tokens(crop(frame, (4, 0))), ids, (8, 8))
        full = vit.embedding(frame)
    assert_equal_up_to_rounding(piece[:, 1:], full[:, 1:][:, ids[0]])
    assert_equal_up_to_rounding(piece[:, 0], full[:, 0])


def test_cached_extractor_tokens_equal_recomputed_ones():
    vit = tiny_vit(depth=4)
    recycler = Recycler(vit, split=2)
    frame = image()
    session = recycler.session(64, 64)
    for at in QUADRANTS[:3]:
        session.add(crop(frame, at), at)
    with torch.no_grad():
        pixels = crop(frame, QUADRANTS[1])
        again = recycler.extract(recycler.patch_tokens(pixels), session.ids[1], (8, 8))
    assert torch.equal(again[:, 1:], session.patches[1])
    assert torch.equal(again[:, :1], session.prefixes[1])


def test_ops_per_step_follow_the_formula():
    vit = tiny_vit(depth=4)
    session = Recycler(vit, split=3).session(64, 64)
    frame = image()
    dim, hidden = 48, 4 * 48  # the formula is written out from the configuration

    def block_cost(n):  # linear layers with biases, q k^T and A v, two residual adds
        linear = n * (dim * 3 * dim + 3 * dim + dim * dim + dim + dim * hidden + hidden)
        linear += n * (hidden * dim + dim)
        return linear + 2 * n * n * dim + 2 * n * dim

    for step, at in enumerate(QUADRANTS, start=1):
        session.add(crop(frame, at), at)
        assert session.ops == 3 * block_cost(1 + 16)
        session.predict()
        assert session.ops == block_cost(1 + 16 * step)
        assert session.recompute_ops == 4 * block_cost(1 + 16 * step)
    description_block = Recycler(vit, split=0).blocks[0]
    assert block_macs(description_block, 17) == block_cost(17)


def test_sessions_in_a_batch_equal_sessions_run_alone():
    vit = tiny_vit(depth=4)
    recycler = Recycler(vit, split=2)
    frames = image(batch=2)
    together = recycler.session(64, 64, batch_size=2)
    places = [torch.tensor([[0, 0], [4, 4]]), torch.tensor([[4, 4], [0, 4]])]
    for at in places:
        pieces = torch.stack([crop(frames[b], tuple(at[b].tolist())) for b in range(2)])
        together.add(pieces, at)
    both = together.predict()
    for stream in range(2):
        alone = recycler.session(64, 64)
        for at in places:
            corner = tuple(at[stream].tolist())
            alone.add(crop(frames[stream : stream + 1], corner), corner)
        single = alone.predict()
        assert torch.equal(single.ids[0], both.ids[stream])
        assert_equal_up_to_rounding(both.tokens[stream : stream + 1], single.tokens)


@pytest.mark.parametrize(
    ("piece", "at", "message"),
    [
        ((4, 4), (0, 2), "overlaps patches already added"),
        ((4, 4), (6, 0), "leaves the 8x8 grid"),
        ((4, 4), (-1, 0), "leaves the 8x8 grid"),
        ((3, 4), (4, 4), "whole patches of 8 pixels"),
    ],
)
def test_a_bad_piece_is_refused_and_the_cache_is_unchanged(piece, at, message):
    vit = tiny_vit()
    session = Recycler(vit, split=1).session(64, 64)
    frame = image()
    session.add(crop(frame, (0, 0)), (0, 0))
    before = [t.clone() for t in session.patches]
    seen = session.seen.clone()
    rows, cols = piece
    pixels = frame[..., : rows * 8 - (4 if rows == 3 else 0), : cols * 8]
    with pytest.raises(ValueError, match=message):
        session.add(pixels, at)
    assert len(session.patches) == 1 and torch.equal(session.patches[0], before[0])
    assert torch.equal(session.seen, seen)


def test_bad_settings_are_refused():
    vit = tiny_vit()
    with pytest.raises(ValueError, match=r"split must be an integer in \[0, 3\], got 4"):
        Recycler(vit, split=4)
    with pytest.raises(ValueError, match="predict\\(\\) needs at least one add\\(\\) first"):
        Recycler(vit, split=1).session(64, 64).predict()
    with pytest.raises(ValueError, match="whole patches of 8 pixels, got 60x64"):
        Recycler(vit, split=1).session(60, 64)


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2WithRegistersModel"])
def test_split_zero_on_every_piece_is_the_hugging_face_model(name):
    torch.manual_seed(0)
    hf_model = randomized(HF_BUILDERS[name]()).eval()
    patch = hf_model.config.patch_size
    side = 32 // patch
    frame = moving_squares(1, size=32, batch=1, seed=4)[0]
    session = Recycler(hf_model, split=0).session(32, 32)
    half = side // 2
    for top in (0, half):
        for left in (0, half):
            pixels = frame[
                ..., top * patch : (top + half) * patch, left * patch : (left + half) * patch
            ]
            session.add(pixels, (top, left))
    prediction = session.predict()
    with torch.no_grad():
        want = hf_model(frame).last_hidden_state
    prefix = want.shape[1] - side * side
    assert_equal_up_to_rounding(prediction.tokens[:, :prefix], want[:, :prefix])
    order = prediction.ids[0]
    assert_equal_up_to_rounding(prediction.tokens[:, prefix:], want[:, prefix:][:, order])


def test_a_patch_mask_adds_a_region_of_any_shape():
    vit = tiny_vit(depth=4)
    recycler = Recycler(vit, split=2)
    frame = image()
    by_mask = recycler.session(64, 64)
    by_crops = recycler.session(64, 64)
    for at in QUADRANTS[:2]:
        mask = torch.zeros(1, 8, 8, dtype=torch.bool)
        mask[:, at[0] : at[0] + 4, at[1] : at[1] + 4] = True
        by_mask.add_patches(frame, mask)
        by_crops.add(crop(frame, at), at)
    assert torch.equal(by_mask.predict().ids, by_crops.predict().ids)
    assert_equal_up_to_rounding(by_mask.predict().tokens, by_crops.predict().tokens)
    diagonal = torch.eye(8, dtype=torch.bool)[None] & ~by_mask.seen.view(1, 8, 8)
    by_mask.add_patches(frame, diagonal)  # any shape: the diagonal of the unseen quadrants
    assert by_mask.predict().tokens.shape == (1, 1 + 32 + 4, 48)
    with pytest.raises(ValueError, match="overlaps patches already added"):
        by_mask.add_patches(frame, diagonal)
    with pytest.raises(ValueError, match="expected a bool patch mask"):
        by_mask.add_patches(frame, diagonal.float())
