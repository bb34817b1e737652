"""PackedLinear: nn.Linear with its weight packed once for oneDNN, exact to rounding, following
every change of its weight, and plain nn.Linear wherever the packed path does not apply."""

import copy
import io

import pytest
import torch
from torch import nn

from eventful.core import kernels, packed_linear
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


def packed_copy_of(packed: PackedLinear, rows: int):
    """The packed weight a call on `rows` rows uses: the small-rows kernel's or oneDNN's."""
    small = rows <= packed_linear.SMALL_ROWS and kernels.small_rows_linear() is not None
    return packed._panels if small else packed._packed


@needs_prepacked
@pytest.mark.parametrize("rows", [7, packed_linear.SMALL_ROWS + 1])  # both packed copies
def test_a_weight_changed_in_place_assigned_or_loaded_is_used_at_the_next_call(rows):
    linear, packed = linear_and_packed()
    x = torch.randn(rows, 48)
    with torch.no_grad():
        packed(x)
        assert packed_copy_of(packed, rows) is not None
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
        torch.testing.assert_close(weights(x), linear.bias.expand(rows, 96))


@needs_prepacked
@pytest.mark.parametrize("rows", [3, packed_linear.SMALL_ROWS + 1])
def test_copies_and_pickles_of_a_used_packed_linear_repack(rows):
    _, packed = linear_and_packed(nn.GELU())
    x = torch.randn(rows, 48)
    with torch.no_grad():
        want = packed(x)
        twin = copy.deepcopy(packed)
        assert twin._packed is None and twin._panels is None
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


def test_from_plain_rows_on_the_layer_is_the_linears_own_call():
    linear, packed = linear_and_packed(nn.GELU())
    rows = packed_linear.PLAIN_ROWS
    with torch.no_grad():
        x = torch.randn(1, rows, 48)
        assert not packed._uses_prepacked(x) and packed._uses_prepacked(x[:, : rows - 1])
        assert torch.equal(packed(x), nn.functional.gelu(linear(x)))


needs_small_rows_kernel = pytest.mark.skipif(
    kernels.small_rows_linear() is None, reason="no C++ compiler to build the small-rows kernel"
)


@needs_small_rows_kernel
@pytest.mark.parametrize(("features", "outputs"), [(48, 96), (37, 5), (384, 1152), (1536, 384)])
def test_the_small_rows_kernel_equals_the_linear_layer_and_each_row_stands_alone(features, outputs):
    """Odd sizes leave a part of a panel and of a register block unused; every row count from 1
    to SMALL_ROWS takes a different mix of blocks, and a row's result never depends on them."""
    torch.manual_seed(1)
    linear = nn.Linear(features, outputs)
    packed = PackedLinear.from_linear(linear, nn.GELU())
    x = torch.randn(packed_linear.SMALL_ROWS, features)
    with torch.inference_mode():
        every = packed(x)
        assert packed._panels is not None
        torch.testing.assert_close(every, nn.functional.gelu(linear(x)), atol=1e-5, rtol=1e-5)
        for rows in range(1, packed_linear.SMALL_ROWS + 1):
            assert torch.equal(packed(x[:rows]), every[:rows])


@needs_small_rows_kernel
def test_the_small_rows_kernel_refuses_what_it_was_not_packed_for():
    module = kernels.small_rows_linear()
    panels = module.pack(torch.randn(96, 48))
    with pytest.raises(RuntimeError, match="panels of pack\\(\\) for 40 input features"):
        module.linear(torch.randn(3, 40), panels, None, 96)
    with pytest.raises(RuntimeError, match="float32"):
        module.pack(torch.randn(96, 48, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="activation 'none' or 'gelu', got 'relu'"):
        module.linear(torch.randn(3, 48), panels, None, 96, None, "relu")


@needs_small_rows_kernel
def test_the_kernels_gelu_follows_the_exact_gelu_far_into_both_tails():
    module = kernels.small_rows_linear()
    panels = module.pack(torch.eye(64))
    x = torch.linspace(-30, 30, 128 * 64).view(128, 64)
    got = module.linear(x, panels, None, 64, None, "gelu").double()
    # The exact GELU from erfc, in float64: PyTorch's forms 1 + erf, which cancels in the tail.
    want = x.double() * torch.special.erfc(-x.double() / 2**0.5) / 2
    torch.testing.assert_close(got, want, atol=4e-7, rtol=1e-6)
    # Float32 PyTorch returns 0 below -5; the kernel keeps the value's digits down to -13, where
    # the value nears float32's least normal number (and the exponent's argument, -x^2 / 2 near
    # -85, is itself rounded to about 1e-5 of the result).
    tail = (x < -5) & (x > -13)
    torch.testing.assert_close(got[tail], want[tail], atol=0, rtol=3e-5)


def test_without_the_kernel_small_rows_run_onednn_or_the_plain_linear(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE, "0")
    monkeypatch.setattr(kernels, "_loaded", {})  # a process that has not asked for them yet
    linear, packed = linear_and_packed(nn.GELU())
    x = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), nn.functional.gelu(linear(x)), atol=1e-5, rtol=1e-5)
    assert packed._panels is None


def test_a_kernel_that_cannot_be_built_warns_once_and_leaves_the_linear_to_pytorch(
    monkeypatch, tmp_path
):
    from torch.utils import cpp_extension

    attempts = []

    def no_compiler(*_args, **_kwargs):
        attempts.append(1)
        raise OSError("no C++ compiler found")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # not the real cache
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.warns(RuntimeWarning, match="could not build its CPU kernels"):
        assert kernels.small_rows_linear() is None
    assert kernels.small_rows_linear() is None  # remembered: no second attempt, no warning
    assert kernels.swap_key_contributions() is None
    monkeypatch.setattr(kernels, "_loaded", {})  # as a new process would start
    assert kernels.small_rows_linear() is None and len(attempts) == 1
    assert "no C++ compiler found" in next(tmp_path.rglob("failed-*.txt")).read_text()
    linear, packed = linear_and_packed()
    x = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
    assert packed._panels is None
