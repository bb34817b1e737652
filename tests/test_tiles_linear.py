"""The linear layer in bfloat16 on AMX tiles (`kernels.tiles_linear`): against float64 sums of
the same bfloat16 rows and weights, row by row independent, and refusing what it cannot read."""

import pytest
import torch
import torch.nn.functional as F

from eventful.core import kernels

needs_tiles = pytest.mark.skipif(
    kernels.tiles_linear() is None,
    reason="no AMX-BF16 tiles on this CPU or in this build (oneDNN or the small-rows kernel runs)",
)


def reference(x, weight, bias):
    """x W^T + b in float64 of x and W rounded to bfloat16."""
    return x.bfloat16().double() @ weight.bfloat16().double().T + bias.double()


@needs_tiles
@pytest.mark.parametrize("shape", [(384, 1152), (1536, 384), (50, 37), (32, 16)])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 64, 257])
def test_the_kernel_equals_float64_sums_of_the_bfloat16_roundings(shape, rows):
    torch.manual_seed(rows)
    features, out = shape
    weight, bias = torch.randn(out, features) / features**0.5, torch.randn(out)
    tiles = kernels.tiles_linear()
    panels = tiles.pack(weight)
    x = torch.randn(rows, features)
    want = reference(x, weight, bias)
    got = tiles.linear(x, panels, bias, out, "none")
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    gelu = tiles.linear(x, panels, bias, out, "gelu")
    torch.testing.assert_close(gelu.double(), F.gelu(want), atol=2e-5, rtol=2e-5)
    without_bias = tiles.linear(x, panels, None, out)
    torch.testing.assert_close(without_bias.double(), want - bias.double(), atol=2e-5, rtol=2e-5)


@needs_tiles
def test_a_row_does_not_depend_on_the_rows_beside_it():
    torch.manual_seed(1)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    tiles = kernels.tiles_linear()
    panels = tiles.pack(weight)
    x = torch.randn(40, 64)
    whole = tiles.linear(x, panels, bias, 96, "gelu")
    for first, last in ((0, 1), (3, 20), (17, 40)):
        part = tiles.linear(x[first:last], panels, bias, 96, "gelu")
        assert torch.equal(part, whole[first:last])


@needs_tiles
def test_the_kernel_refuses_what_it_cannot_read_and_names_it():
    tiles = kernels.tiles_linear()
    panels = tiles.pack(torch.randn(37, 50))
    x = torch.randn(4, 50)
    with pytest.raises(RuntimeError, match="the panels of tiles_pack for 96 input features"):
        tiles.linear(torch.randn(4, 96), panels, None, 37)
    with pytest.raises(RuntimeError, match="and 72 outputs"):
        tiles.linear(x, panels, None, 40 + 32)
    with pytest.raises(RuntimeError, match="float32 CPU rows"):
        tiles.linear(x.double(), panels, None, 37)
    with pytest.raises(RuntimeError, match="a float32 bias of 37 values"):
        tiles.linear(x, panels, torch.randn(36), 37)
    with pytest.raises(RuntimeError, match="the activation 'none' or 'gelu', got 'relu'"):
        tiles.linear(x, panels, None, 37, "relu")
