"""The default drift control on the real DINOv2 saliency model and real frames: a clip that
starts on black, a fade through black and a cut in the first frames stay close to dense."""

import pytest
import torch

import eventful
from eventful.evaluation import feature_cosine
from eventful.models.imgfocus import imgfocus_saliency
from eventful.video import edits
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.video.preprocess import letterbox


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return imgfocus_saliency(cache_dir=tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def bikes():
    return list(decode_frames(registry_clip("bikes.mp4"), 24))


@pytest.fixture(scope="module")
def carphone(bikes):
    height, width = bikes[0].shape[:2]
    return [
        edits.resized(f, height, width)
        for f in decode_frames(registry_clip("carphone_pristine.mp4"), 2)
    ]


def cosines(dense, rgb_frames, drift=eventful.DEFAULT_DRIFT):
    """Per frame, the patch-feature cosine of a default eventful stream to the dense model."""
    stream = eventful.convert(dense, policy=eventful.TopFraction(0.25)).stream(drift=drift)
    values = []
    with torch.no_grad():
        for rgb in rgb_frames:
            frame = letterbox(rgb).unsqueeze(0)
            values.append(feature_cosine(stream(frame).tokens, dense(frame).tokens).item())
    return values


def test_a_black_first_frame_then_a_real_scene_stays_within_002_of_dense(dense, bikes):
    frames = [edits.solid(bikes[0]), *bikes[1:12]]
    with_defaults = cosines(dense, frames)
    assert with_defaults[1] >= 0.98
    assert min(with_defaults) >= 0.9
    assert cosines(dense, frames[:3], drift=None)[1] < 0.5  # what the defaults prevent


@pytest.mark.parametrize("cut_at", [1, 2])
def test_a_cut_in_the_first_frames_stays_within_002_of_dense(dense, bikes, carphone, cut_at):
    frames = [*carphone[:cut_at], *bikes[cut_at:10]]
    assert min(cosines(dense, frames)[cut_at : cut_at + 2]) >= 0.98


def test_a_fade_through_black_stays_close_to_dense(dense, bikes):
    frames = edits.with_fade_through_black(bikes, 4, 6)  # dark at frame 10, back at 16
    values = cosines(dense, frames)
    assert min(values) >= 0.94, values
    assert min(cosines(dense, frames[:12], drift=None)) < 0.1  # the black frame, unrefreshed
