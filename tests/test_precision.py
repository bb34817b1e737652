"""Precisions of the linear layers (`convert(..., precision=)`) and `torch.autocast`.

Tolerances, stated: with every token selected, a stream at a precision equals the same model's
dense steps at that precision within `ROUNDING_TOLERANCE` (both multiply by the same rounded
weights; only the shapes differ). Against the float32 dense model, int8 weights (per output
channel) keep every output at a cosine of at least 0.999 here, bfloat16 at least 0.99.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eventful
from eventful.core import kernels, packed_linear, precision
from eventful.core.local_head import LocalStack
from eventful.core.packed_linear import PackedLinear
from eventful.synthetic import moving_squares
from tests.helpers import LEVELS, ROUNDING_TOLERANCE, VARIANTS, tiny_vit
from tests.test_local_head import saliency_model
from tests.test_models import tensors_of

transformers = pytest.importorskip("transformers")
from tests.test_hf import BUILDERS as HF_BUILDERS  # noqa: E402 (needs transformers)
from tests.test_hf import randomized  # noqa: E402
from tests.test_hf_vitdet import vitdet as hf_vitdet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:eventful.convert. the head layers")

COSINE = {"int8": 0.999, "bf16": 0.99}


def small_models() -> dict:
    """Small dense models of every family, each with its input size."""
    models = {f"vit-{name}": (tiny_vit(**options), 64) for name, options in VARIANTS.items()}
    models["saliency (local head)"] = (saliency_model(), 64)
    for name in ("ViTModel", "Dinov2ForImageClassification", "Dinov2WithRegistersModel"):
        torch.manual_seed(0)
        models[name] = (randomized(HF_BUILDERS[name]()), 32)
    torch.manual_seed(0)
    models["VitDetBackbone"] = (
        randomized(hf_vitdet("VitDetBackbone", out_features=["stage1", "stage3"])),
        64,
    )
    return models


MODELS = small_models()


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU that reports AVX512-BF16 (the arithmetic is PyTorch's either way)."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def every_token_policy(dense, size: int):
    probe = eventful.convert(dense, policy=eventful.TopK(1), level="tokenwise")
    return eventful.TopK(probe.encoder.embedding.num_tokens(size, size))


def all_caches(stream) -> list[torch.Tensor]:
    """Every cached tensor of a stream: its blocks' and its head's."""
    groups = [*stream.state.blocks, *stream.state.heads.values()]
    return [t for caches in groups for t in caches.values() if isinstance(t, torch.Tensor)]


def dense_steps(converted, frames) -> list[list[torch.Tensor]]:
    """The converted model's own dense steps: a stream reset before every frame."""
    stream = converted.stream(batch_size=frames.shape[1], drift=None)
    outputs = []
    for frame in frames:
        stream.reset()
        outputs.append(tensors_of(stream(frame)))
    return outputs


def streamed(converted, frames) -> list[list[torch.Tensor]]:
    stream = converted.stream(batch_size=frames.shape[1], drift=None)
    return [tensors_of(stream(frame)) for frame in frames]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chosen", ["int8", "bf16"])
def test_every_token_selected_equals_the_dense_steps_at_that_precision(name, chosen, request):
    if chosen == "bf16":
        request.getfixturevalue("native_bf16")
    dense, size = MODELS[name]
    frames = moving_squares(3, size=size, batch=2, seed=3)
    with torch.no_grad():
        float_outputs = [tensors_of(dense(frame)) for frame in frames]
    policy = every_token_policy(dense, size)
    for level in LEVELS:
        converted = eventful.convert(dense, policy=policy, level=level, precision=chosen)
        assert converted.precision == chosen
        with torch.inference_mode():
            got, want = streamed(converted, frames), dense_steps(converted, frames)
        for got_step, want_step, float_step in zip(got, want, float_outputs, strict=True):
            for got_tensor, want_tensor, float_tensor in zip(
                got_step, want_step, float_step, strict=True
            ):
                assert got_tensor.dtype == float_tensor.dtype
                torch.testing.assert_close(
                    got_tensor, want_tensor, atol=ROUNDING_TOLERANCE, rtol=ROUNDING_TOLERANCE
                )
                assert cosine(got_tensor, float_tensor) >= COSINE[chosen], (name, level)
                assert not torch.equal(got_tensor, float_tensor)  # the precision is applied


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_under_autocast_every_level_runs_and_its_caches_stay_float32(name, mode):
    dense, size = MODELS[name]
    frames = moving_squares(3, size=size, batch=1, seed=4)
    with torch.no_grad():
        float_outputs = [tensors_of(dense(frame)) for frame in frames]
    for level in LEVELS:
        converted = eventful.convert(dense, policy=eventful.TopFraction(0.5), level=level)
        stream = converted.stream(drift=None)
        with mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = [tensors_of(stream(frame)) for frame in frames]
        for step, float_step in zip(outputs, float_outputs, strict=True):
            for tensor, float_tensor in zip(step, float_step, strict=True):
                assert cosine(tensor, float_tensor) >= COSINE["bf16"], (name, level)
        caches = all_caches(stream)
        assert caches and all(t.dtype == torch.float32 for t in caches)


def test_autocast_makes_the_float32_linear_layers_multiply_in_bfloat16():
    dense, size = MODELS["vit-plain"]
    frame = moving_squares(1, size=size, batch=1, seed=5)[0]
    converted = eventful.convert(dense, policy=eventful.TopK(4))
    with torch.no_grad():
        plain = converted.stream(drift=None)(frame)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = converted.stream(drift=None)(frame)
        off = converted.stream(drift=None)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            assert torch.equal(off(frame), plain)
    assert cast.dtype == torch.float32 and not torch.equal(cast, plain)
    assert cosine(cast, plain) >= COSINE["bf16"]


@pytest.mark.parametrize(
    ("flags", "picked"),
    [
        ({"avx2", "fma", "avx512_bf16", "avx512_vnni"}, "bf16"),
        ({"avx2", "amx_bf16", "amx_tile"}, "bf16"),
        ({"fp", "asimd", "bf16"}, "bf16"),  # Arm
        ({"avx2", "fma", "avx512_vnni"}, "fp32"),
        (set(), "fp32"),
    ],
)
def test_auto_follows_the_cpu_flags(monkeypatch, flags, picked):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert precision.resolve_precision("auto") == picked
    converted = eventful.convert(tiny_vit(), policy=eventful.TopK(4), precision="auto")
    assert converted.precision == picked
    assert {layer.precision for layer in linear_layers(converted)} == {picked}


def test_the_cpu_flags_are_read_from_this_machine():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    if flags:  # Linux: the same flags the kernels' build names its CPU by
        assert all(" " not in flag for flag in flags)


def linear_layers(converted) -> list[PackedLinear]:
    return [m for m in converted.modules() if isinstance(m, PackedLinear)]


def test_bf16_without_native_support_and_unknown_precisions_are_refused(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(ValueError, match="precision 'bf16' needs native bfloat16 matmuls"):
        eventful.convert(tiny_vit(), policy=eventful.TopK(4), precision="bf16")
    with pytest.raises(ValueError, match=r"precision must be one of .* got 'fp16'"):
        eventful.convert(tiny_vit(), policy=eventful.TopK(4), precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        PackedLinear(4, 4, precision="auto")


@pytest.mark.parametrize("level", ["tokenwise", "exact"])
def test_caches_and_the_layers_outputs_stay_float32_at_bf16(level, native_bf16):
    dense, size = MODELS["vit-layer_scale"]
    converted = eventful.convert(dense, policy=eventful.TopK(9), level=level, precision="bf16")
    stream = converted.stream(drift=None)
    for frame in moving_squares(3, size=size, batch=1, seed=6):
        assert stream(frame).dtype == torch.float32
    assert stream.state.dtype == torch.float32
    for caches in stream.state.blocks:
        for name, cache in caches.items():
            # The tokenwise level's qkv buffer, which attention reads only rounded to
            # bfloat16, holds its rows rounded so (test_low_precision_attention.py).
            rounded = level == "tokenwise" and name == "qkv"
            assert cache.dtype == (torch.bfloat16 if rounded else torch.float32), name
    heads = [t for caches in stream.state.heads.values() for t in caches.values()]
    assert all(t.dtype == torch.float32 for t in heads if isinstance(t, torch.Tensor))
    assert all(p.dtype == torch.float32 for p in converted.parameters())


def test_a_snapshot_refuses_a_model_converted_at_another_precision():
    dense, size = MODELS["vit-plain"]
    frames = moving_squares(2, size=size, batch=1, seed=2)
    stream = eventful.convert(dense, policy=eventful.TopK(8), precision="int8").stream()
    for frame in frames:
        stream(frame)
    saved = io.BytesIO()
    torch.save(stream.state_dict(), saved)
    saved.seek(0)
    snapshot = torch.load(saved)
    other = eventful.convert(dense, policy=eventful.TopK(8)).stream()
    with pytest.raises(ValueError, match=r"precision 'int8'.* runs 'fp32'.*precision='int8'"):
        other.load_state_dict(snapshot)
    assert not other.state.allocated  # nothing changed
    same = eventful.convert(dense, policy=eventful.TopK(8), precision="int8").stream()
    same.load_state_dict(snapshot)
    del snapshot["configuration"]["precision"]  # a snapshot from before precisions: float32
    with pytest.raises(ValueError, match="precision 'fp32'"):
        same.load_state_dict(snapshot)
    other.load_state_dict(snapshot)


def int8_layer(rows_in: int = 48, rows_out: int = 96, activation=None) -> tuple:
    torch.manual_seed(0)
    linear = nn.Linear(rows_in, rows_out)
    return linear, PackedLinear.from_linear(linear, activation, precision="int8")


def rounded_linear(linear: nn.Linear) -> nn.Linear:
    """`linear` with its weight rounded to int8 steps per output channel."""
    rounded = copy.deepcopy(linear)
    with torch.no_grad():
        rounded.weight.copy_(precision.quantized(linear.weight, "int8")[0])
    return rounded


@pytest.mark.parametrize("rows", [1, 5, 64, packed_linear.SMALL_ROWS + 1, packed_linear.PLAIN_ROWS])
def test_an_int8_layer_multiplies_by_its_rounded_weight_on_every_path(rows):
    linear, layer = int8_layer(activation=nn.GELU())
    want_linear = rounded_linear(linear)
    x = torch.randn(rows, 48)
    with torch.inference_mode():
        got = layer(x)
        torch.testing.assert_close(got, F.gelu(want_linear(x)), atol=1e-5, rtol=1e-5)
        assert not torch.equal(got, F.gelu(linear(x)))
        assert torch.equal(layer(x.clone()), got)  # same shapes: bit for bit
    assert torch.equal(layer.weight, linear.weight)  # the parameter keeps the given weight


def test_the_int8_small_rows_kernel_reads_int8_panels_and_each_row_stands_alone():
    module = kernels.small_rows_linear()
    if module is None:
        pytest.skip("no C++ compiler to build the small-rows kernel")
    torch.manual_seed(2)
    weight, bias = torch.randn(37, 53), torch.randn(37)  # odd sizes: part of a panel unused
    rounded, scale = precision.quantized(weight, "int8")
    panels = module.pack(rounded, scale)
    assert panels.dtype == torch.int8 and panels.abs().max() == 127
    x = torch.randn(packed_linear.SMALL_ROWS, 53)
    every = module.linear(x, panels, bias, 37, scale)
    torch.testing.assert_close(every, F.linear(x, rounded, bias), atol=1e-5, rtol=1e-5)
    for rows in range(1, packed_linear.SMALL_ROWS + 1):
        assert torch.equal(module.linear(x[:rows], panels, bias, 37, scale), every[:rows])
    with pytest.raises(RuntimeError, match="a scale with int8 panels and only with them"):
        module.linear(x, panels, bias, 37)
    with pytest.raises(RuntimeError, match="float32 scale of 37 values"):
        module.pack(weight, scale[:5])


def test_an_int8_layer_follows_weight_changes_copies_and_pickles():
    linear, layer = int8_layer()
    x = torch.randn(6, 48)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2.0)
        linear.weight.mul_(2.0)
        torch.testing.assert_close(layer(x), rounded_linear(linear)(x), atol=1e-5, rtol=1e-5)
        want = layer(x)
        twin = copy.deepcopy(layer)
        assert twin.precision == "int8" and torch.equal(twin(x), want)
        saved = io.BytesIO()
        torch.save(layer, saved)
        saved.seek(0)
        loaded = torch.load(saved, weights_only=False)
        assert loaded.precision == "int8" and torch.equal(loaded(x), want)
    assert layer.state_dict().keys() == linear.state_dict().keys()
    assert "precision=int8" in repr(layer)


def test_a_channel_of_zeros_gets_scale_one_and_stays_zero():
    weight = torch.randn(4, 8)
    weight[2] = 0
    rounded, scale = precision.quantized(weight, "int8")
    assert scale[2] == 1 and torch.equal(rounded[2], torch.zeros(8))
    assert ((rounded - weight).abs() <= scale.unsqueeze(1) / 2 + 1e-7).all()


def bfloat16_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x times the weight, both rounded to bfloat16, summed in float64, plus the bias."""
    return (x.bfloat16().double() @ weight.bfloat16().double().t() + bias.double()).float()


def test_the_bf16_small_rows_kernel_reads_bfloat16_pairs_and_each_row_stands_alone():
    module = kernels.small_rows_linear()
    if module is None:
        pytest.skip("no C++ compiler to build the small-rows kernel")
    torch.manual_seed(3)
    weight, bias = torch.randn(37, 53), torch.randn(37)  # odd sizes: a pair and a panel part-used
    panels = module.pack(weight, None, True)
    assert panels.dtype == torch.bfloat16 and panels.shape[1:] == (27, panels.shape[2], 2)
    x = torch.randn(packed_linear.BF16_SMALL_ROWS, 53)
    every = module.linear(x, panels, bias, 37, None)
    # float32 sums of the bfloat16 products: far closer than bfloat16's own rounding (4e-3)
    torch.testing.assert_close(every, bfloat16_reference(x, weight, bias), atol=2e-5, rtol=2e-5)
    for rows in range(1, packed_linear.BF16_SMALL_ROWS + 1):
        assert torch.equal(module.linear(x[:rows], panels, bias, 37, None), every[:rows])
    with pytest.raises(RuntimeError, match=r"a scale \(int8 panels\) or bfloat16, not both"):
        module.pack(weight, torch.ones(37), True)
    with pytest.raises(RuntimeError, match=r"the panels of pack\(\) for 52 input features"):
        module.linear(x[:, :52].contiguous(), panels, bias, 37, None)


@pytest.mark.parametrize(
    "rows", [1, packed_linear.BF16_SMALL_ROWS, packed_linear.BF16_SMALL_ROWS + 1, 600]
)
def test_a_bf16_layer_multiplies_bfloat16_rounded_rows_and_weights_on_every_path(rows, native_bf16):
    torch.manual_seed(4)
    linear = nn.Linear(48, 40)
    layer = PackedLinear.from_linear(linear, nn.GELU(), precision="bf16")
    x = torch.randn(rows, 48)
    with torch.inference_mode():
        got = layer(x)
        want = F.gelu(bfloat16_reference(x, linear.weight, linear.bias))
        # oneDNN and PyTorch round their bfloat16 output (above the small-rows kernel's rows)
        tolerance = 2e-5 if rows <= packed_linear.BF16_SMALL_ROWS else 1e-2
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
        assert got.dtype == torch.float32
        assert torch.equal(layer(x.clone()), got)  # same shapes: bit for bit
    assert torch.equal(layer.weight, linear.weight)


@pytest.mark.parametrize("rows", [packed_linear.BF16_SMALL_ROWS, 64, 300])
@pytest.mark.parametrize("tiles", [True, False])
def test_a_bf16_mlp_keeps_its_hidden_rows_in_bfloat16_with_the_same_values(
    rows, tiles, native_bf16, monkeypatch
):
    if not tiles:  # oneDNN's path, where the CPU has no AMX tiles
        monkeypatch.setattr(kernels, "tiles_linear", lambda: None)
    torch.manual_seed(6)
    fc1 = PackedLinear.from_linear(nn.Linear(48, 96), nn.GELU(), precision="bf16")
    fc2 = PackedLinear.from_linear(nn.Linear(96, 40), precision="bf16")
    x = torch.randn(rows, 48)
    with torch.inference_mode():
        got = packed_linear.mlp_forward(fc1, fc2, x)
        # fc2 rounds its input to bfloat16 as fc1 gave it: the same as through float32, bit for
        # bit, on every path (oneDNN's above the small-rows kernel's rows, the kernel's below).
        assert torch.equal(got, fc2(fc1(x)))
        assert got.dtype == torch.float32
        tiles = kernels.tiles_linear() is not None and rows <= packed_linear.TILES_MAX_ROWS
        if packed_linear.PREPACKED_BF16 and rows > packed_linear.BF16_SMALL_ROWS and not tiles:
            assert fc1._runs_prepacked_bfloat16(x) and fc2._takes_prepacked_bfloat16_rows()
        else:  # the tiles kernel or the small-rows kernel: float32 hidden rows
            assert not fc1._runs_prepacked_bfloat16(x)
        with torch.enable_grad():  # recording gradients: the layers' own path
            assert not fc1._runs_prepacked_bfloat16(x.requires_grad_())


def test_at_bf16_attention_over_every_row_runs_in_bfloat16_and_returns_float32(native_bf16):
    from eventful.core import attention

    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 20, 8, generator=generator) for _ in range(3))
    low = [t.bfloat16() for t in (q, k, v)]
    out = attention.softmax_attention(q, k, v, dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    assert torch.equal(out, F.scaled_dot_product_attention(*low, scale=1.0).float())
    out, logsumexp = attention.attention_with_logsumexp(q, k, v, dtype=torch.bfloat16)
    assert out.dtype == logsumexp.dtype == torch.float32
    want = torch.logsumexp(low[0].double() @ low[1].double().transpose(-1, -2), dim=-1)
    torch.testing.assert_close(logsumexp.double(), want, atol=1e-3, rtol=1e-3)
    for chosen, dtype in (("bf16", torch.bfloat16), ("int8", None), ("fp32", None)):
        converted = eventful.convert(tiny_vit(), policy=eventful.TopK(4), precision=chosen)
        assert all(block.attention_dtype == dtype for block in converted.blocks)


def test_at_bf16_a_recompute_of_every_row_keeps_float32_caches(native_bf16):
    converted = eventful.convert(
        tiny_vit(), policy=eventful.TopK(60), level="exact", precision="bf16"
    )
    stream = converted.stream(drift=None)
    with torch.inference_mode():
        for frame in moving_squares(3, size=64, batch=1, seed=6):
            stream(frame)
    assert all(t.dtype == torch.float32 for t in all_caches(stream))


def local_stacks(model) -> list[LocalStack]:
    return [module for module in model.modules() if isinstance(module, LocalStack)]


def test_at_bf16_a_heads_dense_convolutions_multiply_in_bfloat16(native_bf16):
    dense, _ = MODELS["saliency (local head)"]
    for chosen in ("fp32", "int8"):
        other = eventful.convert(dense, policy=eventful.TopK(4), precision=chosen)
        assert all(stack.compute_dtype is None for stack in local_stacks(other))
    converted = eventful.convert(dense, policy=eventful.TopK(4), precision="bf16")
    stacks = local_stacks(converted)
    assert stacks and all(stack.compute_dtype == torch.bfloat16 for stack in stacks)
    stack = stacks[0]
    conv = stack.stages[0][0]
    inputs = torch.randn(2, conv.in_channels, 5, 7)  # a size other than the model's

    def in_bfloat16():
        with torch.no_grad():
            return copy.deepcopy(conv).to(torch.bfloat16)(inputs.bfloat16()).float()

    with torch.inference_mode():
        got = stack._convolve(0, conv, inputs)
    assert got.dtype == torch.float32
    assert torch.equal(got, in_bfloat16())
    with torch.no_grad():
        assert not torch.equal(got, conv(inputs))
        conv.weight.mul_(2)  # the rounded weight follows the layer's
        assert torch.equal(stack._convolve(0, conv, inputs), in_bfloat16())
        conv.weight.div_(2)
    # Under autograd the layer runs as it is, in float32.
    assert torch.equal(stack._convolve(0, conv, inputs), conv(inputs))
