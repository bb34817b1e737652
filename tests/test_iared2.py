"""IA-RED^2: interpreters drop patches for real (shorter tensors), hierarchically, and keeping
every token is the dense model."""

import itertools

import pytest
import torch

import eventful
from eventful.core.reduction import Restricted
from eventful.methods.iared2 import IARed2Model, KeepRule, convert_with_interpreters
from eventful.methods.iared2_train import Trainer, TrainSettings, read_checkpoint, restore_adam
from eventful.methods.token_scores import (
    ClassAttentionScores,
    KeepCounts,
    NormScores,
    RandomScores,
)
from eventful.models.imgfocus import imgfocus_saliency
from eventful.synthetic import moving_squares
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.video.preprocess import letterbox
from tests.helpers import VARIANTS, tiny_vit
from tests.test_hf import BUILDERS as HF_BUILDERS
from tests.test_hf import randomized
from tests.test_models import tensors_of

TOLERANCE = 1e-4
KEEP_ALL = KeepRule(threshold=0.0)


def frames(batch: int = 2, size: int = 64, seed: int = 3) -> torch.Tensor:
    return moving_squares(1, size=size, batch=batch, seed=seed)[0]


def tiny(**options) -> eventful.ViT:
    # 6 blocks: 3 groups of 2.
    return tiny_vit(depth=6, **options)


class RandomDrops:
    """Keeps each present token with probability `keep`, from its own generator."""

    def __init__(self, keep: float, seed: int = 0) -> None:
        self.keep = keep
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group, probabilities, present):
        draw = torch.rand(probabilities.shape, generator=self.generator)
        return present & (draw < self.keep)


@pytest.mark.parametrize("variant", VARIANTS)
def test_keeping_every_token_is_the_dense_model(variant):
    vit = tiny(**VARIANTS[variant])
    model = IARed2Model(vit)
    batch = frames()
    with torch.no_grad():
        torch.testing.assert_close(
            model(batch, KEEP_ALL), vit(batch), rtol=TOLERANCE, atol=TOLERANCE
        )
    assert all(bool(kept.all()) for kept in model.last.kept)
    # the trainer's teacher: the same blocks, no interpreter
    dense = model.dropping.dense(batch)
    torch.testing.assert_close(dense, vit(batch), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2Model"])
def test_keeping_every_token_is_the_dense_hugging_face_model(name):
    torch.manual_seed(0)
    hf_model = randomized(HF_BUILDERS[name]()).eval()
    model = IARed2Model(hf_model, groups=2)
    batch = frames(size=32)
    with torch.no_grad():
        got, want = tensors_of(model(batch, KEEP_ALL)), tensors_of(hf_model(batch))
    assert len(got) == len(want)
    for got_tensor, want_tensor in zip(got, want, strict=True):
        torch.testing.assert_close(got_tensor, want_tensor, rtol=TOLERANCE, atol=TOLERANCE)


def test_a_dropped_token_stays_dropped_and_prefix_tokens_stay():
    vit = tiny(num_registers=2)
    model = IARed2Model(vit)
    with torch.no_grad():
        output = model(frames(batch=3), RandomDrops(0.6))
    kept, probabilities = model.last.kept, model.last.probabilities
    assert [k.shape for k in kept] == [(3, 64)] * 3  # patches only: prefix tokens are not scored
    for earlier, later in itertools.pairwise(kept):
        assert not bool((later & ~earlier).any())
    # A token dropped before group 2 gets no score there.
    assert bool((probabilities[2][~kept[1]] == 0).all())
    assert bool((kept[2].sum(1) < kept[0].sum(1)).all())
    assert output.shape == (3, 3 + 64, 48)


def masked_reference(vit: eventful.ViT, batch: torch.Tensor, kept: list[torch.Tensor]):
    """The same drops written as masks over the whole sequence: a dropped token is no key for
    any query after its drop, and its features stay as they were when it was dropped."""
    x = vit.embedding(batch)
    prefix = vit.embedding.num_prefix_tokens
    present = torch.ones(x.shape[:2], dtype=torch.bool)
    for group, start in enumerate((0, 2, 4)):
        present = present.clone()
        present[:, prefix:] = kept[group]
        for block in vit.blocks[start : start + 2]:
            normed = block.norm1(x)
            q, k, v = block.attn.qkv(normed).view(*x.shape[:2], 3, 4, 12).permute(2, 0, 3, 1, 4)
            logits = (q @ k.transpose(-1, -2)) / 12**0.5
            logits = logits.masked_fill(~present[:, None, None, :], float("-inf"))
            attended = (logits.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
            y = x + block.ls1(block.attn.proj(attended))
            y = y + block.ls2(block.mlp(block.norm2(y)))
            x = torch.where(present.unsqueeze(-1), y, x)  # dropped tokens keep their features
    return vit.norm(x)


def test_removing_tokens_equals_masking_them():
    vit = tiny(layer_scale_init=0.5)
    model = IARed2Model(vit)
    batch = frames(batch=3)
    with torch.no_grad():
        removed = model(batch, RandomDrops(0.7, seed=1))
        masked = masked_reference(vit, batch, model.last.kept)
    torch.testing.assert_close(removed, masked, rtol=TOLERANCE, atol=TOLERANCE)


def test_a_ragged_batch_equals_its_streams_run_alone():
    vit = tiny()
    model = IARed2Model(vit)
    batch = frames(batch=3)
    with torch.no_grad():
        together = model(batch, RandomDrops(0.5, seed=2))
        decisions = model.last.kept
        assert len({int(k.sum()) for k in decisions[2]}) > 1  # the counts differ
        for stream in range(3):

            def replay(group, probabilities, present, stream=stream):
                return present & decisions[group][stream : stream + 1]

            alone = model(batch[stream : stream + 1], replay)
            torch.testing.assert_close(
                together[stream : stream + 1], alone, rtol=TOLERANCE, atol=TOLERANCE
            )


def test_ops_count_each_groups_blocks_on_the_tokens_it_kept():
    vit = tiny()
    model = IARed2Model(vit)
    batch = frames(batch=2)
    with torch.no_grad():
        model(batch, KEEP_ALL)
    dropping = model.dropping
    interpreters = sum(interpreter.macs(64) for interpreter in dropping.interpreters)
    assert model.last.macs == [dropping.dense_macs(batch) + interpreters] * 2
    with torch.no_grad():
        model(batch, RandomDrops(0.5, seed=4))
    kept = [int(k[0].sum()) for k in model.last.kept]
    scored = [64, *kept[:2]]
    # Per block on n tokens: linear layers 12 n d^2 plus biases, attention 2 n^2 d, adds 2 n d.
    d, hidden = 48, 4 * 48
    per_block = [
        (1 + n) * (3 * d * d + 3 * d + d * d + d + d * hidden + hidden + hidden * d + d)
        + 2 * (1 + n) ** 2 * d
        + 2 * (1 + n) * d
        for n in kept
    ]
    expected = sum(2 * cost for cost in per_block)
    expected += sum(i.macs(n) for i, n in zip(dropping.interpreters, scored, strict=True))
    assert model.last.macs[0] == expected


def test_keep_at_most_k_and_above_a_probability():
    probabilities = torch.tensor([[0.9, 0.2, 0.6, 0.8, 0.7]])
    present = torch.tensor([[True, True, True, False, True]])
    assert KeepRule()(probabilities, present).tolist() == [[True, False, True, False, True]]
    assert KeepRule(max_tokens=2)(probabilities, present).tolist() == [
        [True, False, False, False, True]
    ]
    assert KeepRule(threshold=0.0, max_tokens=4)(probabilities, present).sum() == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": 1.5}, r"threshold must lie in \[0, 1\], got 1.5"),
        ({"max_tokens": -1}, "max_tokens must be a non-negative integer or None, got -1"),
    ],
)
def test_a_bad_keep_rule_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        KeepRule(**options)


def test_models_it_cannot_drop_tokens_from_are_refused_in_one_line():
    with pytest.raises(ValueError, match="block 0 attends within windows"):
        IARed2Model(
            eventful.ViTDet(
                image_size=64, patch_size=8, dim=48, depth=2, heads=4, window=4, global_blocks=(1,)
            )
        )
    with pytest.raises(ValueError, match="cannot split 6 blocks into 4 equal groups"):
        IARed2Model(tiny(), groups=4)
    with pytest.raises(ValueError, match="group starts must begin at block 0"):
        IARed2Model(tiny(), groups=(1, 3))


def trainer_for(vit, steps: int = 2, seed: int = 0) -> Trainer:
    model = IARed2Model(vit)
    video = moving_squares(4, size=64, batch=2, seed=seed).flatten(0, 1)
    return Trainer(model, video, TrainSettings(steps_per_group=steps, batch_size=4))


def test_a_checkpoint_round_trip_gives_identical_scores(tmp_path):
    vit = tiny()
    trainer = trainer_for(vit)
    for _ in range(3):
        trainer.step()
    path = tmp_path / "iared2.safetensors"
    trainer.save(path)
    restored = IARed2Model(vit)
    read_checkpoint(path, restored)
    batch = frames(batch=2)
    with torch.no_grad():
        trainer.model(batch)
        restored(batch)
    for got, want in zip(
        restored.last.probabilities, trainer.model.last.probabilities, strict=True
    ):
        assert torch.equal(got, want)


def test_training_resumed_from_a_checkpoint_continues_as_if_never_stopped(tmp_path):
    vit = tiny()
    straight = trainer_for(vit)
    for _ in range(4):
        straight.step()
    first = trainer_for(vit)
    for _ in range(3):
        first.step()
    path = tmp_path / "iared2.safetensors"
    first.save(path)
    model = IARed2Model(vit)
    checkpoint = read_checkpoint(path, model)
    video = moving_squares(4, size=64, batch=2, seed=0).flatten(0, 1)
    resumed = Trainer(model, video, checkpoint.settings, checkpoint.progress)
    restore_adam(resumed.optimizer, model, checkpoint)
    resumed.step()

    def without_time(log):
        return [{k: v for k, v in entry.items() if k != "seconds"} for entry in log]

    assert without_time(resumed.progress.log) == without_time(straight.progress.log)
    for got, want in zip(
        model.interpreters.state_dict().values(),
        straight.model.interpreters.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(got, want)


def test_a_checkpoint_for_another_model_is_refused_and_changes_nothing(tmp_path):
    trainer = trainer_for(tiny(seed=0))
    trainer.step()
    path = tmp_path / "iared2.safetensors"
    trainer.save(path)
    other = IARed2Model(tiny(seed=1))
    before = {k: v.clone() for k, v in other.interpreters.state_dict().items()}
    with pytest.raises(ValueError, match="trained for the backbone with fingerprint"):
        read_checkpoint(path, other)
    assert all(torch.equal(before[k], v) for k, v in other.interpreters.state_dict().items())
    grouped = IARed2Model(tiny(seed=0), groups=2)
    with pytest.raises(ValueError, match="has interpreters"):
        read_checkpoint(path, grouped)


def test_a_missing_or_corrupt_checkpoint_is_refused(tmp_path):
    model = IARed2Model(tiny())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "none.safetensors", model)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint")
    corrupt.with_suffix(".json").write_text("{}")
    with pytest.raises(ValueError, match="cannot be read"):
        read_checkpoint(corrupt, model)


def test_bad_training_settings_are_refused():
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        TrainSettings(batch_size=1)
    with pytest.raises(ValueError, match=r"bar must lie in \(0, 1\), got 1.2"):
        TrainSettings(bar=1.2)
    with pytest.raises(ValueError, match="at least batch_size = 8 frames, got 4"):
        Trainer(IARed2Model(tiny()), frames(batch=4), TrainSettings())
    with pytest.raises(ValueError, match="at least batch_size = 8 frames, got 0"):
        Trainer(IARed2Model(tiny()), frames(batch=4)[:0], TrainSettings())


def test_a_short_training_run_on_real_frames_raises_the_reward(tmp_path):
    """The first group's interpreter of the real DINOv2 ViT-S/14, a few steps on real frames:
    it learns to drop tokens while staying near the dense model."""
    dense = imgfocus_saliency(cache_dir=tmp_path)
    clips = ("bikes.mp4", "bigbuckbunny.mp4")
    video = [
        letterbox(f) for clip in clips for f in list(decode_frames(registry_clip(clip), 64))[::8]
    ]
    model = IARed2Model(dense)
    trainer = Trainer(model, torch.stack(video), TrainSettings(steps_per_group=8, batch_size=8))
    rewards = [trainer.step()["reward"] for _ in range(8)]
    assert sum(rewards[-3:]) / 3 > rewards[0] + 0.1
    assert trainer.progress.log[-1]["keep_share"] < trainer.progress.log[0]["keep_share"]


def test_interpreters_that_keep_everything_leave_the_eventful_model_unchanged():
    vit = tiny()
    iared2 = IARed2Model(vit)
    video = moving_squares(4, size=64, batch=2, seed=6)
    plain = eventful.convert(vit, policy=eventful.TopK(16), level="exact").stream(batch_size=2)
    both = convert_with_interpreters(vit, iared2, eventful.TopK(16), "exact", KEEP_ALL)
    combined = both.stream(batch_size=2)
    interpreters = sum(i.macs(64) for i in iared2.interpreters)
    for frame in video:
        assert torch.equal(combined(frame), plain(frame))
        assert combined.ops.per_stream[0]["gates"] == plain.ops.per_stream[0]["gates"] + (
            interpreters
        )


def test_gates_never_reprocess_a_patch_the_interpreters_dropped():
    vit = tiny()
    iared2 = IARed2Model(vit)
    rule = KeepRule(threshold=0.0, max_tokens=20)
    converted = convert_with_interpreters(vit, iared2, eventful.TopK(40), "exact", rule)
    stream = converted.stream(batch_size=2)
    video = moving_squares(3, size=64, batch=2, seed=7)
    stream(video[0])  # the first step is dense: every token, whatever the interpreters say
    assert all(
        selection.everything for block in stream.trace.blocks for selection in block.values()
    )
    for frame in video[1:]:
        stream(frame)
        reduction = converted.encoder.reduction
        allowed = None
        for group, start in enumerate(iared2.dropping.starts):
            kept = rule(reduction.last[group], torch.ones(2, 64, dtype=torch.bool))
            allowed = kept if allowed is None else allowed & kept
            for block in stream.trace.blocks[start : start + 2]:
                for selection in block.values():
                    patches = selection.mask()[:, 1:]
                    assert not bool((patches & ~allowed).any())
        assert int(allowed[0].sum()) < 20  # the groups' drops compound


def test_interpreters_built_for_another_backbone_are_refused():
    with pytest.raises(ValueError, match="built for another backbone"):
        convert_with_interpreters(tiny(seed=1), IARed2Model(tiny(seed=0)), eventful.TopK(8))


def test_a_restricted_policy_chooses_only_among_the_allowed_tokens():
    errors = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    allowed = torch.tensor([[False, True, True, True, True, False], [True] * 6])
    # A fraction is of the allowed tokens: half of 4 and half of 6.
    chosen = Restricted(eventful.TopFraction(0.5), allowed).select(errors).mask()
    assert chosen.tolist() == [
        [False, True, True, False, False, False],
        [False, False, False, True, True, True],
    ]
    # A threshold or a count keeps its own meaning, cut to the allowed tokens.
    chosen = Restricted(eventful.Threshold(2.5), allowed).select(errors).mask()
    assert chosen.tolist() == [
        [False, True, True, False, False, False],
        [False, False, True, True, True, True],
    ]
    assert Restricted(eventful.TopK(5), allowed).select(errors).counts == [4, 5]


def test_the_easy_alternatives_keep_the_counts_they_are_given_by_their_scores():
    vit = tiny()
    dropping = IARed2Model(vit).dropping
    batch = frames(batch=2)
    counts = [[40, 30, 20], [50, 25, 10]]
    for scorers in (
        [RandomScores(seed) for seed in range(3)],
        [NormScores() for _ in range(3)],
        [ClassAttentionScores(dropping.blocks[start]) for start in dropping.starts],
    ):
        dropping.interpreters = torch.nn.ModuleList(scorers)
        with torch.no_grad():
            result = dropping(batch, KeepCounts(counts))
        assert [[int(kept[b].sum()) for kept in result.kept] for b in range(2)] == counts
    # Token norm at the first group: the patches of largest norm after the embedding.
    with torch.no_grad():
        norms = vit.embedding(batch)[:, 1:].norm(dim=-1)
    expected = norms.topk(40, dim=1).indices.sort(dim=1).values
    dropping.interpreters = torch.nn.ModuleList(NormScores() for _ in range(3))
    with torch.no_grad():
        kept = dropping(batch, KeepCounts(counts)).kept[0]
    assert torch.equal(kept[0].nonzero().squeeze(1), expected[0])
