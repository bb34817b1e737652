"""Factorised ViViT: tubelets, the eventful spatial model across time steps, multi-view
evaluation, the sliding-window classifier, and the refusal of joint space-time models."""

import pytest
import torch
import torch.nn.functional as F

import eventful
from eventful.clip_classifier import (
    EventfulViViT,
    SlidingWindowClassifier,
    clip_views,
    temporal_macs,
)
from eventful.core.ops import dense_macs
from eventful.models.vivit import ViViT, inflate, tubelet_steps
from eventful.synthetic import moving_squares
from tests.helpers import assert_equal_up_to_rounding

LEVELS = ("tokenwise", "qk", "full", "exact")


def tiny_vivit(seed: int = 0, tubelet: int = 2, registers: int = 0) -> ViViT:
    torch.manual_seed(seed)
    spatial = eventful.ViT(
        image_size=32, patch_size=8, dim=48, depth=2, heads=4, in_chans=3 * tubelet,
        num_registers=registers,
    )  # fmt: skip
    return ViViT(spatial, tubelet, temporal_depth=1, num_classes=5, max_steps=8).eval()


def clips(frames: int = 8, batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(B, T, 3, size, size) clips of moving squares."""
    return moving_squares(frames, size=size, batch=batch, seed=seed).transpose(0, 1)


def test_tubelet_steps_stack_frames_and_pad_by_repeating_the_last():
    clip = clips(5, batch=1)
    steps = tubelet_steps(clip, 2)
    assert steps.shape == (1, 3, 6, 32, 32)
    assert torch.equal(steps[0, 0], torch.cat([clip[0, 0], clip[0, 1]]))
    assert torch.equal(steps[0, 2], torch.cat([clip[0, 4], clip[0, 4]]))
    short = tubelet_steps(clip[:, :1], 4)  # shorter than one tubelet
    assert torch.equal(short[0, 0], clip[0, 0].repeat(4, 1, 1))


def test_the_tubelet_embedding_is_a_3d_convolution_over_the_tubelet():
    vivit = tiny_vivit()
    clip = clips(4, batch=1)
    projection = vivit.spatial.embedding.patch_projection
    weight = projection.weight.view(48, 2, 3, 8, 8).transpose(1, 2)  # (D, C, t, p, p)
    with torch.no_grad():
        want = F.conv3d(clip.transpose(1, 2), weight, projection.bias, stride=(2, 8, 8))
        got = projection(vivit.steps(clip).flatten(0, 1))
    assert_equal_up_to_rounding(got, want[0].transpose(0, 1))


def test_an_inflated_image_model_gives_its_tokens_on_a_still_tubelet():
    torch.manual_seed(0)
    image_model = eventful.ViT(image_size=32, patch_size=8, dim=48, depth=2, heads=4).eval()
    inflated = inflate(image_model, 3)
    frame = clips(1, batch=1)[:, 0]
    with torch.no_grad():
        assert_equal_up_to_rounding(inflated(frame.repeat(1, 3, 1, 1)), image_model(frame))


@pytest.mark.parametrize("level", LEVELS)
def test_every_token_selected_is_the_dense_vivit_at_every_level(level):
    vivit = tiny_vivit(registers=1)
    batch = clips(7)
    with torch.no_grad():
        want = vivit(batch)
    for policy in (eventful.TopFraction(1.0), eventful.Threshold(0.0)):
        converted = eventful.convert(vivit, policy=policy, level=level)
        assert isinstance(converted, EventfulViViT)
        assert_equal_up_to_rounding(converted(batch), want)


def test_ops_of_a_clip_are_the_spatial_steps_and_the_temporal_model():
    vivit = tiny_vivit()
    converted = EventfulViViT(vivit, eventful.TopFraction(0.25))
    converted(clips(8))
    spatial = dense_macs(converted.spatial.blocks, 17)  # 1 + 4 x 4 tokens per step
    temporal = temporal_macs(vivit, 4)
    assert converted.dense_ops == [4 * spatial + temporal] * 2
    assert all(temporal < spent < 4 * spatial + temporal for spent in converted.ops)


def test_multi_view_output_equals_view_by_view_evaluation():
    vivit = tiny_vivit()
    videos = clips(10, batch=2, size=40)
    views = clip_views(videos, length=6, size=32, temporal=2, spatial=3)
    assert views.shape == (2, 6, 6, 3, 32, 32)
    converted = EventfulViViT(vivit, eventful.TopFraction(0.4), level="full")
    together = converted.views(views)
    for clip in range(2):
        alone = torch.stack([converted(views[clip, view][None])[0] for view in range(6)])
        assert_equal_up_to_rounding(together[clip], alone.mean(dim=0))


def test_clip_views_take_evenly_spaced_windows_and_crops():
    wide = clips(10, batch=1, size=40)[..., 2:38, :]  # 36 x 40 pixels
    views = clip_views(wide, length=4, size=32, temporal=3, spatial=2)
    assert torch.equal(views[0, 0], wide[0, 0:4, :, 2:34, 0:32])  # centred across, first along
    assert torch.equal(views[0, 1], wide[0, 0:4, :, 2:34, 8:40])
    assert torch.equal(views[0, 4], wide[0, 6:10, :, 2:34, 0:32])
    tall = wide.transpose(-1, -2)
    assert torch.equal(clip_views(tall, 4, 32, spatial=2)[0, 1], tall[0, 3:7, :, 8:40, 2:34])
    padded = clip_views(wide[:, :2], length=4, size=32)
    assert torch.equal(padded[0, 0, 3], wide[0, 1, :, 2:34, 4:36])


def test_bad_views_and_clips_are_refused():
    vivit = tiny_vivit()
    converted = EventfulViViT(vivit, eventful.TopFraction(0.5))
    video = clips(4, batch=1)
    with pytest.raises(ValueError, match=r"as many views; got view counts \[2, 3\]"):
        converted.views([video.repeat(2, 1, 1, 1, 1), video.repeat(3, 1, 1, 1, 1)])
    with pytest.raises(ValueError, match="crops of 40 pixels do not fit frames of 32x32"):
        clip_views(video, length=4, size=40)
    with pytest.raises(ValueError, match="temporal must be a positive integer"):
        clip_views(video, length=4, size=32, temporal=0)
    with pytest.raises(ValueError, match=r"clips of 3 channels \(B, T, 3, H, W\)"):
        converted(torch.zeros(1, 4, 1, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of the tubelet's 4 frames"):
        ViViT(vivit.spatial, tubelet=4)
    with pytest.raises(ValueError, match="needs a class token"):
        ViViT(eventful.ViT(32, 8, 48, 1, 4, in_chans=6, class_token=False), tubelet=2)
    with pytest.raises(ValueError, match="takes 1 to 8 time steps, got 9"):
        vivit(clips(18, batch=1))


def test_the_sliding_window_equals_recomputing_the_window_with_every_token_selected():
    vivit = tiny_vivit()
    video = clips(14, batch=2)
    window = 3
    live = SlidingWindowClassifier(vivit, eventful.TopFraction(1.0), window, batch_size=2)
    for index in range(video.shape[1]):
        logits = live(video[:, index])
        if index % 2 == 0:
            assert logits is None  # the tubelet is not complete yet
            continue
        steps = (index + 1) // 2
        first = 2 * max(0, steps - window)
        with torch.no_grad():
            want = vivit(video[:, first : index + 1])
        assert_equal_up_to_rounding(logits, want)


def test_the_sliding_window_costs_less_than_recomputing_it():
    vivit = tiny_vivit()
    video = clips(16, batch=1)
    live = SlidingWindowClassifier(vivit, eventful.TopFraction(0.25), window=4)
    for frame in video[0]:
        live(frame[None])
    spatial = dense_macs(live.stream.model.blocks, 17)
    assert live.recompute_ops == [4 * spatial + temporal_macs(vivit, 4)]
    assert live.ops[0] < 0.5 * live.recompute_ops[0]


def test_the_sliding_window_refuses_bad_frames_and_keeps_its_state():
    vivit = tiny_vivit()
    video = clips(3, batch=1)
    live = SlidingWindowClassifier(vivit, eventful.TopFraction(0.5), window=2)
    live(video[:, 0])
    live(video[:, 1])
    live(video[:, 2])
    pending, tokens = [t.clone() for t in live.pending], [t.clone() for t in live.tokens]
    bad = video[:, 0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        live(bad)
    with pytest.raises(ValueError, match=r"expected frames \(1, 3, H, W\)"):
        live(video[:, 0, :1])
    with pytest.raises(ValueError, match="differ from the tubelet's first"):
        live(torch.zeros(1, 3, 40, 40))
    assert all(torch.equal(a, b) for a, b in zip(live.pending, pending, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(live.tokens, tokens, strict=True))
    with pytest.raises(ValueError, match="window must be 1 to 8 time steps"):
        SlidingWindowClassifier(vivit, eventful.TopFraction(0.5), window=9)


@pytest.mark.parametrize(
    ("name", "why"),
    [("VivitModel", "attends jointly"), ("TimesformerModel", "attends across time steps")],
)
def test_hugging_face_joint_space_time_models_are_refused_with_the_reason(name, why):
    transformers = pytest.importorskip("transformers")
    config_class = getattr(transformers, name.replace("Model", "Config"))
    config = config_class(
        image_size=32, num_frames=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    model = getattr(transformers, name)(config)
    with pytest.raises(TypeError, match=f"{why}.*eventful.models.vivit.ViViT"):
        eventful.convert(model, policy=eventful.TopFraction(0.5))
