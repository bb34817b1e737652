"""PackedLinear: nn.Linear with its weight packed once for oneDNN, exact to rounding, following
every change of its weight, and plain nn.Linear wherever the packed path does not apply."""

import copy
import io

import pytest
import torch
from torch import nn

from eventful.core import packed_linear
from eventful.core.fingerprint import forget_weight_caches
from eventful.core.packed_linear import PackedLinear

needs_prepacked = pytest.mark.skipif(
    not packed_linear.PREPACKED, reason="this torch build has no oneDNN prepacked linear"
)


def linear_and_packed(activation=None, bias=True):
    torch.manual_seed(0)
    linear = nn.Linear(48, 96, bias=bias)
    return linear, PackedLinear.from_linear(linear, activation)


@pytest.mark.parametrize("rows", [1, 5, 64, 257])
@pytest.mark.parametrize("activation", [None, nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU()])
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_equals_the_linear_and_its_activation(rows, activation, bias):
    linear, packed = linear_and_packed(activation, bias)
    x = torch.randn(rows, 48)
    want = linear(x) if activation is None else activation(linear(x))
    with torch.no_grad():
        torch.testing.assert_close(packed(x), want, atol=1e-5, rtol=1e-5)
        assert torch.equal(packed(x), packed(x.clone()))  # same shapes: bit for bit
        assert packed(x.view(1, rows, 48)).shape == (1, rows, 96)


def test_its_parameters_and_state_dict_are_those_of_the_linear():
    linear, packed = linear_and_packed(nn.GELU())
    assert isinstance(packed, nn.Linear)
    assert packed.state_dict().keys() == linear.state_dict().keys()
    assert all(torch.equal(packed.state_dict()[k], v) for k, v in linear.state_dict().items())


@needs_prepacked
def test_a_weight_changed_in_place_assigned_or_loaded_is_used_at_the_next_call():
    linear, packed = linear_and_packed()
    x = torch.randn(7, 48)
    with torch.no_grad():
        packed(x)
        assert packed._packed is not None
        packed.weight.mul_(2.0)  # in place
        linear.weight.mul_(2.0)
        torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
        packed.weight = nn.Parameter(linear.weight * 3.0)  # assigned
        torch.testing.assert_close(
            packed(x), 3.0 * linear(x) - 2.0 * linear.bias, atol=1e-4, rtol=1e-4
        )
        other = nn.Linear(48, 96)
        packed.load_state_dict(other.state_dict())
        torch.testing.assert_close(packed(x), other(x), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # no version counter: forgotten explicitly
        weights = PackedLinear.from_linear(linear)
        weights(x)
        weights.weight.zero_()
        forget_weight_caches(weights)
        torch.testing.assert_close(weights(x), linear.bias.expand(7, 96))


@needs_prepacked
def test_copies_and_pickles_of_a_used_packed_linear_repack():
    _, packed = linear_and_packed(nn.GELU())
    x = torch.randn(3, 48)
    with torch.no_grad():
        want = packed(x)
        twin = copy.deepcopy(packed)
        assert twin._packed is None
        assert torch.equal(twin(x), want)
        saved = io.BytesIO()
        torch.save(packed, saved)
        saved.seek(0)
        assert torch.equal(torch.load(saved, weights_only=False)(x), want)


def test_recording_gradients_runs_the_plain_linear_and_trains_its_weight():
    linear, packed = linear_and_packed(nn.GELU())
    x = torch.randn(4, 48)
    packed(x).sum().backward()
    nn.functional.gelu(linear(x)).sum().backward()
    torch.testing.assert_close(packed.weight.grad, linear.weight.grad)


def test_other_dtypes_run_the_plain_linear():
    linear, packed = linear_and_packed()
    x = torch.randn(4, 48, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(packed.double()(x), linear.double()(x))
