"""A stream's estimate of its own fidelity: 1 on dense steps, lower the more change its gates
leave unprocessed, fitted to measurements, and refused for another model or level."""

import math

import pytest
import torch

import eventful
from eventful.calibration import calibrate_fidelity_estimate
from eventful.core.estimate import FidelityEstimate, fit_fidelity_estimate
from eventful.core.fingerprint import model_fingerprint
from eventful.synthetic import moving_squares
from tests.helpers import tiny_vit


def converted(level="exact", seed=0):
    return eventful.convert(tiny_vit(seed), policy=eventful.TopK(8), level=level)


def estimate_for(model, coefficient=2.0, exponent=1.0):
    fingerprint = model_fingerprint(model.encoder)
    return FidelityEstimate(coefficient, exponent, fingerprint, tuple(model.levels), 10, 0.9)


def test_more_unprocessed_change_gives_a_lower_estimate_and_dense_steps_one():
    model = converted()
    stream = model.stream(drift=None, estimate=estimate_for(model))
    base = moving_squares(1, size=64, seed=3)[0]
    stream(base)
    assert stream.estimated_cosine == [1.0]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(base.shape, generator=generator)
    estimates = []
    for size in (0.05, 0.2, 0.5, 1.0):  # every frame strays further from the first
        stream(base + size * noise)
        estimates.append(stream.estimated_cosine[0])
    assert all(value < 1 for value in estimates)
    assert estimates == sorted(estimates, reverse=True) and len(set(estimates)) == 4


def test_each_stream_of_a_batch_has_its_own_estimate():
    model = converted()
    stream = model.stream(batch_size=2, drift=None, estimate=estimate_for(model))
    video = moving_squares(3, size=64, batch=2, seed=4)
    video[1:, 1] += 0.5 * torch.randn(video[1:, 1].shape)  # stream 1 changes everywhere
    for frame in video:
        stream(frame)
    still, changing = stream.estimated_cosine
    assert changing < still < 1


def test_the_fit_recovers_a_power_law_and_is_pessimistic_on_the_quantile():
    shares = [0.001 * 1.15**i for i in range(40)]  # 0.001 to 0.23
    cosines = [1 - 0.5 * u**1.5 for u in shares]
    exact = fit_fidelity_estimate(shares, cosines, "f", ("exact",), quantile=0.5)
    assert exact.exponent == pytest.approx(1.5, rel=1e-6)
    assert exact.coefficient == pytest.approx(0.5, rel=1e-6)
    # Scatter above and below the law: the 0.9 quantile is pessimistic on 90% of the points.
    scattered = [1 - (1 - c) * (1.5 if i % 2 else 0.7) for i, c in enumerate(cosines)]
    cautious = fit_fidelity_estimate(shares, scattered, "f", ("exact",), quantile=0.9)
    estimated = cautious.cosine(torch.tensor(shares)).tolist()
    optimistic = sum(e > c + 1e-9 for e, c in zip(estimated, scattered, strict=True))
    assert optimistic <= math.ceil(0.1 * len(shares))


def test_calibration_on_frames_fits_this_model_and_estimates_are_informative():
    vit = tiny_vit()
    model = eventful.convert(vit, policy=eventful.TopK(8))
    clips = [list(moving_squares(12, size=64, seed=seed)) for seed in (1, 2)]
    estimate = calibrate_fidelity_estimate(vit, model, clips)
    assert estimate.fingerprint == model_fingerprint(model.encoder)
    assert estimate.exponent > 0 and estimate.coefficient > 0
    assert isinstance(model.policy, eventful.TopK) and model.policy.k == 8  # restored
    stream = model.stream(drift=None, estimate=estimate)
    for frame in moving_squares(6, size=64, seed=5):
        stream(frame)
        assert 0 < stream.estimated_cosine[0] <= 1


def test_an_estimate_round_trips_through_json(tmp_path):
    model = converted()
    estimate = estimate_for(model, coefficient=0.37, exponent=1.25)
    estimate.save(tmp_path / "estimate.json")
    assert FidelityEstimate.load(tmp_path / "estimate.json") == estimate


def test_an_estimate_for_another_model_is_refused():
    estimate = estimate_for(converted(seed=1))
    with pytest.raises(ValueError, match="calibrated for the model with fingerprint"):
        converted(seed=2).stream(estimate=estimate)


def test_an_estimate_for_another_level_is_refused():
    estimate = estimate_for(converted("exact"))
    with pytest.raises(ValueError, match=r"calibrated at levels \['exact'\].*runs \['full'\]"):
        converted("full").stream(estimate=estimate)
