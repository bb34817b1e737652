"""Fine-tuning for token recycling: layouts, the batched forward, training, checkpoints."""

import json
from itertools import pairwise

import pytest
import torch

from eventful.methods.tore import Recycler
from eventful.methods.tore_train import (
    Trainer,
    TrainSettings,
    learning_rate,
    load_tuned,
    random_layout,
    read_checkpoint,
    tuned_parameters,
)
from eventful.synthetic import moving_squares
from tests.helpers import assert_equal_up_to_rounding, tiny_vit


def frames(count: int = 6, seed: int = 0) -> torch.Tensor:
    return moving_squares(count, size=64, batch=1, seed=seed)[:, 0]


def settings(**changes) -> TrainSettings:
    return TrainSettings(**{"steps": 6, "batch_size": 2, "warmup_steps": 2, **changes})


def weights(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_weights(module, saved: dict) -> bool:
    return all(torch.equal(saved[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("grid", [(8, 8), (16, 16), (2, 3)])
def test_a_random_layout_covers_the_grid_once_with_1_to_16_pieces(grid):
    counts = set()
    for seed in range(40):
        layout = random_layout(grid, 4, torch.Generator().manual_seed(seed))
        covered = torch.zeros(grid, dtype=torch.int64)
        for top, left, rows, cols in layout:
            assert rows >= 1 and cols >= 1
            covered[top : top + rows, left : left + cols] += 1
        assert bool((covered == 1).all())
        counts.add(len(layout))
    assert min(counts) >= 1 and max(counts) <= min(grid[0], 4) * min(grid[1], 4)
    assert len(counts) > 3  # layouts vary


def test_the_forward_over_pieces_is_what_a_session_predicts():
    vit = tiny_vit(num_registers=1)
    batch = frames(2)
    pieces = [(4, 0, 4, 8), (0, 0, 2, 3), (0, 3, 2, 5), (2, 0, 2, 8)]  # two of one size
    for split in (0, 2, 3):
        recycler = Recycler(vit, split)
        with torch.no_grad():
            got = recycler(batch, pieces)
        session = recycler.session(64, 64, batch_size=2)
        for top, left, rows, cols in pieces:
            pixels = batch[..., top * 8 : (top + rows) * 8, left * 8 : (left + cols) * 8]
            session.add(pixels, (top, left))
        want = session.predict()
        assert torch.equal(got.ids, want.ids)
        assert_equal_up_to_rounding(got.tokens, want.tokens)


def test_the_forward_over_every_piece_at_split_zero_is_the_full_model():
    vit = tiny_vit()
    batch = frames(2)
    with torch.no_grad():
        got = Recycler(vit, 0)(batch, [(0, 0, 8, 4), (0, 4, 8, 4)])
        want = vit(batch)
    left = [r * 8 + c for r in range(8) for c in range(4)]
    assert got.ids[0].tolist() == left + [id + 4 for id in left]
    assert_equal_up_to_rounding(got.tokens[:, 0], want[:, 0])
    assert_equal_up_to_rounding(got.tokens[:, 1:], want[:, 1:][:, got.ids[0]])


def test_the_forward_refuses_bad_pieces():
    recycler = Recycler(tiny_vit(), 1)
    batch = frames(1)
    with pytest.raises(ValueError, match="overlaps an earlier one"):
        recycler(batch, [(0, 0, 4, 4), (2, 2, 4, 4)])
    with pytest.raises(ValueError, match="leaves the 8x8 grid"):
        recycler(batch, [(6, 6, 4, 4)])
    with pytest.raises(ValueError, match="at least one piece"):
        recycler(batch, [])
    with pytest.raises(ValueError, match="at least one patch each way, got 0x4"):
        recycler(batch, [(0, 0, 0, 4)])
    with pytest.raises(ValueError, match="whole patches of 8 pixels"):
        recycler(batch[..., :60], [(0, 0, 4, 4)])


def test_training_tunes_the_model_in_place_and_keeps_the_teacher_frozen():
    vit = tiny_vit()
    before = weights(vit)
    trainer = Trainer(vit, frames(), settings())
    trainer.run()
    assert trainer.progress.step == 6 and len(trainer.progress.log) == 6
    assert not same_weights(vit, before)
    teacher = trainer.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    reference = tiny_vit()
    with torch.no_grad():
        assert torch.equal(teacher(frames(2), [(0, 0, 8, 8)]).tokens, reference(frames(2)))
    splits = {entry["split"] for entry in trainer.progress.log}
    assert splits <= set(range(4))


def test_repeated_steps_on_one_layout_bring_the_recycled_model_closer_to_the_dense_one():
    """The distillation gradient points the right way: on a fixed batch, split and layout,
    the recycled prediction moves towards the frozen model's full prediction."""
    vit = tiny_vit()
    trainer = Trainer(vit, frames(), settings(steps=30, warmup_steps=1, learning_rate=1e-3))
    batch = frames(4)
    pieces = [(0, 0, 4, 4), (0, 4, 4, 4), (4, 0, 4, 4), (4, 4, 4, 4)]
    student = trainer.students[3]

    def distance() -> float:
        with torch.no_grad():
            got = student(batch, pieces).tokens
            want = trainer.teacher(batch, pieces).tokens
        return float((1 - torch.cosine_similarity(got, want, dim=-1)).mean())

    start = distance()
    optimizer = trainer.optimizer
    for _ in range(30):
        got = student(batch, pieces).tokens
        with torch.no_grad():
            want = trainer.teacher(batch, pieces).tokens
        loss = (1 - torch.cosine_similarity(got, want, dim=-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert distance() < 0.5 * start


def test_the_learning_rate_warms_up_then_decays_to_zero():
    chosen = settings(steps=100, warmup_steps=10, learning_rate=1.0)
    rates = [learning_rate(chosen, step) for step in range(100)]
    assert rates[0] == pytest.approx(0.1, abs=1e-3)
    assert max(rates) == pytest.approx(rates[9])
    assert all(a >= b for a, b in pairwise(rates[9:]))
    assert rates[-1] < 0.01


def test_vectors_tunes_only_parameters_with_one_long_dimension():
    vit = tiny_vit()
    vectors = tuned_parameters(vit, "vectors")
    assert vectors and all(p.numel() == max(p.shape, default=1) for p in vectors)
    assert len(tuned_parameters(vit, "all")) == len(list(vit.parameters()))


def test_training_resumed_from_a_checkpoint_continues_as_if_never_stopped(tmp_path):
    straight = Trainer(tiny_vit(), frames(), settings())
    straight.run()
    path = tmp_path / "tore.safetensors"
    first_vit = tiny_vit()
    first = Trainer(first_vit, frames(), settings(steps=6))
    for _ in range(4):
        first.step()
    first.save(path)
    resumed_vit = tiny_vit()
    resumed = Trainer(resumed_vit, frames(), settings())
    resumed.resume(read_checkpoint(path))
    resumed.run()

    def without_time(log):
        return [{k: v for k, v in entry.items() if k != "seconds"} for entry in log]

    assert without_time(resumed.progress.log) == without_time(straight.progress.log)
    assert same_weights(resumed_vit, weights(straight.encoder))


def test_a_tuned_checkpoint_loads_into_the_model_it_was_tuned_from(tmp_path):
    vit = tiny_vit()
    trainer = Trainer(vit, frames(), settings(steps=3))
    path = tmp_path / "tore.safetensors"
    trainer.run(checkpoint=path, every=2)
    assert json.loads(path.with_suffix(".json").read_text())["progress"]["step"] == 3
    fresh = load_tuned(tiny_vit(), path)
    assert same_weights(fresh, weights(vit))


def test_a_checkpoint_for_another_model_is_refused_and_changes_nothing(tmp_path):
    trainer = Trainer(tiny_vit(seed=0), frames(), settings(steps=1))
    path = tmp_path / "tore.safetensors"
    trainer.run(checkpoint=path)
    other = tiny_vit(seed=1)
    before = weights(other)
    with pytest.raises(ValueError, match="tuned from the model with fingerprint"):
        load_tuned(other, path)
    assert same_weights(other, before)
    wider = tiny_vit(seed=0, dim=64)
    with pytest.raises(ValueError, match="tuned from the model with fingerprint"):
        load_tuned(wider, path)
    resumer = Trainer(tiny_vit(seed=1), frames(), settings(steps=1))
    with pytest.raises(ValueError, match="tuned from the model with fingerprint"):
        resumer.resume(read_checkpoint(path))
    assert resumer.progress.step == 0


def test_bad_checkpoints_and_settings_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "none.safetensors")
    trainer = Trainer(tiny_vit(), frames(), settings(steps=1))
    path = tmp_path / "tore.safetensors"
    trainer.save(path)
    meta = path.with_suffix(".json")
    meta.write_text(meta.read_text().replace("eventful-tore/1", "eventful-iared2/1"))
    with pytest.raises(ValueError, match="not a TORE checkpoint"):
        read_checkpoint(path)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint")
    corrupt.with_suffix(".json").write_text("{}")
    with pytest.raises(ValueError, match="cannot be read"):
        read_checkpoint(corrupt)
    trainer.save(path)
    other_settings = Trainer(tiny_vit(), frames(), settings(steps=9))
    with pytest.raises(ValueError, match="was trained with"):
        other_settings.resume(read_checkpoint(path))
    for bad in ({"steps": 0}, {"batch_size": 1.5}, {"learning_rate": 0.0}, {"tuned": "some"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            settings(**bad)
    with pytest.raises(ValueError, match="at least batch_size = 8 frames"):
        Trainer(tiny_vit(), frames(4), TrainSettings())


def test_a_hugging_face_encoder_is_refused_and_its_own_vit_copy_tunes():
    transformers = pytest.importorskip("transformers")
    from eventful.models.hf import vit_from_hf

    config = transformers.ViTConfig(
        image_size=64, patch_size=8, hidden_size=48, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=96,
    )  # fmt: skip
    encoder = transformers.ViTModel(config).eval()
    with pytest.raises(TypeError, match="runs through a converted copy"):
        Trainer(encoder, frames(), settings(steps=1))
    vit = vit_from_hf(encoder)
    before = weights(vit)
    Trainer(vit, frames(), settings(steps=1)).run()
    assert not same_weights(vit, before)
