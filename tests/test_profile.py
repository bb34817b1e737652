"""`eventful.profile`: the parts of a frame's time, summed while a profile is active."""

import time

import pytest
import torch

import eventful
from eventful.profile import Profile, part
from eventful.synthetic import moving_squares
from tests.helpers import tiny_vit


def test_parts_add_up_only_while_a_profile_is_active():
    with part("encoder"):
        pass  # no profile: nothing is kept anywhere
    with Profile() as profile:
        with part("encoder"):
            time.sleep(0.01)
        with part("encoder"):
            time.sleep(0.01)
    with part("encoder"):
        time.sleep(0.01)
    assert set(profile.seconds) == {"encoder"}
    assert 0.02 <= profile.seconds["encoder"] < 1.0


def test_one_profile_at_a_time():
    with Profile(), pytest.raises(RuntimeError, match="already active"), Profile():
        pass


def test_the_table_gives_the_head_as_the_model_minus_its_encoder():
    profile = Profile()
    for name, seconds in {"model": 0.8, "encoder": 0.6, "drift": 0.1, "count": 0.1}.items():
        profile.add(name, seconds)
    lines = profile.table(frames=10).splitlines()
    rows = {line.split()[0]: line.split()[1:3] for line in lines[1:]}
    assert rows["encoder"] == ["60.0", "60%"]
    assert rows["head"] == ["20.0", "20%"]
    assert rows["drift"] == ["10.0", "10%"]
    assert rows["eventful"][:2] == ["frame", "100.0"]


def test_a_stream_marks_its_parts():
    model = eventful.convert(tiny_vit(), policy=eventful.TopK(8))
    stream = model.stream()
    with Profile() as profile, torch.no_grad():
        for frame in moving_squares(3, size=64):
            stream(frame)
    assert set(profile.seconds) == {"drift", "model", "count"}
    assert all(seconds > 0 for seconds in profile.seconds.values())
