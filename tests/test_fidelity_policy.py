"""`Fidelity(target)`: each gate selects what keeps the stream's estimated cosine at the target."""

import pytest
import torch

import eventful
from eventful.core.estimate import FidelityEstimate
from eventful.core.fidelity_policy import Fidelity
from eventful.core.fingerprint import model_fingerprint
from eventful.core.policies import parse_policy
from tests.helpers import tiny_vit

LEVEL = "exact"


def estimate_for(converted, coefficient: float = 2.0, exponent: float = 1.0) -> FidelityEstimate:
    return FidelityEstimate(
        coefficient,
        exponent,
        model_fingerprint(converted.encoder),
        tuple(converted.levels),
        10,
        0.9,
    )


def test_the_share_bound_inverts_the_estimate():
    converted = eventful.convert(tiny_vit(), policy=eventful.TopK(4), level=LEVEL)
    policy = Fidelity(0.98, estimate_for(converted, coefficient=0.5, exponent=2.0))
    assert policy.share_bound() == pytest.approx((0.02 / 0.5) ** 0.5)
    assert Fidelity(1.0, estimate_for(converted)).share_bound() == 0.0


def norms_with_changes(changed: int, tokens: int = 100) -> torch.Tensor:
    """Error norms (1, tokens): `changed` tokens moved by 1, the others by 0.001."""
    norms = torch.full((1, tokens), 0.001)
    norms[0, :changed] = 1.0
    return norms


def test_more_change_selects_more_tokens_and_never_fewer_than_the_floor():
    converted = eventful.convert(tiny_vit(), policy=eventful.TopK(4), level=LEVEL)
    policy = Fidelity(0.99, estimate_for(converted), floor=0.05)
    size = torch.tensor([100.0])  # the gate's size: 100 tokens of norm 1
    counts = [policy.select_within_size(norms_with_changes(c), size).counts[0] for c in range(60)]
    assert counts == sorted(counts)  # more change, never fewer tokens
    assert min(counts) == 5  # the floor: 5% of 100 tokens
    bound = policy.share_bound() * 100
    for changed, count in zip(range(60), counts, strict=True):
        left = norms_with_changes(changed)[0].sort(descending=True).values[count:].sum()
        assert left <= bound + 1e-6  # what it leaves is within the share bound
        if count > 5:  # and one token fewer would not be
            fewer = norms_with_changes(changed)[0].sort(descending=True).values[count - 1 :]
            assert fewer.sum() > bound


def test_the_cap_bounds_the_count_and_target_one_selects_every_changed_token():
    converted = eventful.convert(tiny_vit(), policy=eventful.TopK(4), level=LEVEL)
    capped = Fidelity(0.999, estimate_for(converted), cap=0.2)
    size = torch.tensor([100.0])
    assert capped.select_within_size(norms_with_changes(90), size).counts[0] == 20
    exact = Fidelity(1.0, estimate_for(converted), floor=0.0)
    norms = norms_with_changes(30)
    norms[0, 50:] = 0  # unchanged tokens
    assert exact.select_within_size(norms, size).counts[0] == 50


def test_a_stream_keeps_its_estimate_at_the_target_and_spends_by_the_change():
    dense = tiny_vit()
    converted = eventful.convert(dense, policy=eventful.TopK(4), level=LEVEL)
    estimate = estimate_for(converted, coefficient=1.0, exponent=1.0)
    converted.policy = Fidelity(0.995, floor=0.0)
    stream = converted.stream(drift=None, estimate=estimate)
    assert converted.policy.estimate is estimate  # the stream bound its estimate
    torch.manual_seed(0)
    still = torch.randn(1, 3, 64, 64)
    stream(still)
    stream(still + 0.001 * torch.randn_like(still))
    quiet = stream.updated_fraction()[0]
    assert stream.estimated_cosine[0] >= 0.995
    stream(still + 0.5 * torch.randn_like(still))
    assert stream.updated_fraction()[0] > quiet
    assert stream.estimated_cosine[0] >= 0.995 - 1e-9


def test_every_token_at_target_one_equals_the_dense_model():
    dense = tiny_vit()
    converted = eventful.convert(dense, policy=eventful.TopK(4), level=LEVEL)
    converted.policy = Fidelity(1.0, estimate_for(converted), floor=0.0)
    stream = converted.stream(drift=None)
    torch.manual_seed(1)
    frames = torch.randn(3, 1, 3, 64, 64)
    with torch.no_grad():
        for frame in frames:
            torch.testing.assert_close(stream(frame), dense(frame), atol=1e-4, rtol=1e-4)


def test_bad_targets_and_a_missing_estimate_are_refused():
    for target in (0, -0.5, 1.5, float("nan"), "0.9"):
        with pytest.raises(ValueError, match="Fidelity expects a target in \\(0, 1\\]"):
            Fidelity(target)
    with pytest.raises(ValueError, match="floor <= cap"):
        Fidelity(0.9, floor=0.5, cap=0.2)
    converted = eventful.convert(tiny_vit(), policy=Fidelity(0.98), level=LEVEL)
    stream = converted.stream(drift=None)
    frame = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"no fidelity estimate.*calibrate_fidelity_estimate"):
        stream(frame)
    assert not stream.state.allocated  # refused before any cache was touched


def test_the_command_line_form_is_cosine():
    policy = parse_policy("cosine:0.98")
    assert isinstance(policy, Fidelity) and policy.target == 0.98
    with pytest.raises(ValueError, match="Fidelity expects a target"):
        parse_policy("cosine:1.5")
