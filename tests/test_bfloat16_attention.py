"""The engine's attention over every row in bfloat16 on AMX tiles (`kernels.bfloat16_attention`)
against attention in float64 of the same bfloat16 inputs, and the steps that run it."""

import pytest
import torch

import eventful
from eventful.core import block as block_module
from eventful.core import kernels, precision
from eventful.core.attention import bfloat16_attention_kernel
from eventful.synthetic import moving_squares
from tests.helpers import tiny_vit

needs_tiles = pytest.mark.skipif(
    kernels.bfloat16_attention() is None,
    reason="no AMX-BF16 tiles on this CPU or in this build (PyTorch's fused attention runs)",
)


def qkv_heads(groups: int, heads: int, tokens: int, seed: int = 0):
    """q, k, v (G, H, N, 64) bfloat16: strided views of a qkv buffer (G, N, 3 H 64), as a
    block's step has them."""
    generator = torch.Generator().manual_seed(seed)
    buffer = torch.randn(groups, tokens, 3 * heads * 64, generator=generator) / 4
    split = buffer.bfloat16().view(groups, tokens, 3, heads, 64).permute(2, 0, 3, 1, 4)
    return split.unbind(0)


def reference(q, k, v):
    """Attention and log-sum-exp in float64 of the same bfloat16 values."""
    logits = q.double() @ k.double().transpose(-1, -2)
    return torch.softmax(logits, -1) @ v.double(), torch.logsumexp(logits, -1)


@needs_tiles
@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 33, 61, 257, 577])
def test_the_kernel_equals_attention_in_float64_within_bfloat16_rounding(tokens):
    q, k, v = qkv_heads(2, 3, tokens)
    output, logsumexp = kernels.bfloat16_attention()(q, k, v)
    want, want_logsumexp = reference(q, k, v)
    assert output.dtype == torch.float32 and output.shape == q.shape
    # The weights are rounded to bfloat16 (8 bits) before they multiply the values.
    assert torch.allclose(output.double(), want, atol=2e-3, rtol=1e-2)
    assert torch.allclose(logsumexp.double(), want_logsumexp, atol=1e-4)
    # The heads side by side: the tokens' rows are a view.
    assert output.transpose(1, 2).is_contiguous()


@needs_tiles
def test_a_row_does_not_depend_on_the_other_groups_or_the_threads():
    q, k, v = qkv_heads(3, 2, 50, seed=1)
    whole = kernels.bfloat16_attention()(q, k, v)
    alone = kernels.bfloat16_attention()(q[1:2], k[1:2], v[1:2])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = kernels.bfloat16_attention()(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole[0][1:2], alone[0]) and torch.equal(whole[1][1:2], alone[1])
    assert torch.equal(whole[0], single[0]) and torch.equal(whole[1], single[1])


@needs_tiles
def test_the_kernel_refuses_what_it_cannot_read_and_names_it():
    q, k, v = qkv_heads(1, 2, 20)
    kernel = kernels.bfloat16_attention()
    with pytest.raises(RuntimeError, match="heads of 64 features, got 32"):
        kernel(q[..., :32], k[..., :32], v[..., :32])
    with pytest.raises(RuntimeError, match="bfloat16 \\(or float32\\) CPU tensors of one dtype"):
        kernel(q.float(), k, v)
    with pytest.raises(RuntimeError, match="bfloat16 \\(or float32\\) CPU tensors of one dtype"):
        kernel(q.half(), k.half(), v.half())
    with pytest.raises(RuntimeError, match="of one shape"):
        kernel(q, k[:, :, :10], v)
    with pytest.raises(RuntimeError, match=r"heads_out as a contiguous float32 tensor of shape"):
        kernel(q, k, v, torch.empty(1, 2, 19, 64))
    with pytest.raises(RuntimeError, match=r"heads_out as a contiguous float32 tensor of shape"):
        kernel(q, k, v, torch.empty(1, 2, 64, 20).transpose(2, 3))


@needs_tiles
def test_float32_inputs_are_rounded_as_read_and_the_heads_output_takes_the_same_values():
    """The one-call step hands the kernel its float32 qkv buffer: the same result, bit for bit,
    as the buffer rounded to bfloat16 first; `heads_out` (G, H, N, dh) gets the output too."""
    generator = torch.Generator().manual_seed(3)
    buffer = torch.randn(2, 37, 3 * 2 * 64, generator=generator) / 4
    single = buffer.view(2, 37, 3, 2, 64).permute(2, 0, 3, 1, 4).unbind(0)
    rounded = buffer.bfloat16().view(2, 37, 3, 2, 64).permute(2, 0, 3, 1, 4).unbind(0)
    kernel = kernels.bfloat16_attention()
    heads_out = torch.full((2, 2, 37, 64), float("nan"))
    output, logsumexp = kernel(*single, heads_out)
    want, want_logsumexp = kernel(*rounded)
    assert torch.equal(output, want) and torch.equal(logsumexp, want_logsumexp)
    assert torch.equal(heads_out, want)


def test_the_kernel_applies_only_where_it_can_and_pays():
    q, k, v = qkv_heads(1, 2, 20)
    available = kernels.bfloat16_attention() is not None
    assert (bfloat16_attention_kernel(q, k, v) is not None) == available
    long = qkv_heads(1, 2, 577)  # ViT-B/16 @ 384: PyTorch's fused attention is as fast there
    for other in ((q.float(), k.float(), v.float()), (q[..., :32], k[..., :32], v[..., :32]), long):
        assert bfloat16_attention_kernel(*other) is None


@pytest.mark.parametrize("level", ["tokenwise", "exact"])
@pytest.mark.parametrize("count", [5, 14])
def test_steps_with_heads_of_64_features_equal_the_general_step_at_bf16(level, count, monkeypatch):
    """With heads of 64 features the steps at precision bf16 attend on the kernel where the CPU
    has AMX tiles (else on PyTorch's fused attention): the general step, the lean step and the
    one-call step give the same outputs, bit for bit."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    vit = tiny_vit(dim=128, heads=2)
    converted = eventful.convert(vit, policy=eventful.TopK(count), level=level, precision="bf16")
    video = moving_squares(6, size=80, batch=2, seed=9)[..., 16:64, :]
    outputs = []
    for lean, fused in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(block_module, "LEAN_STEPS", lean)
        monkeypatch.setattr(block_module, "FUSED_BLOCK_STEPS", fused)
        stream = converted.stream(batch_size=2, drift=None)
        with torch.inference_mode():
            outputs.append(torch.stack([stream(frames) for frames in video]))
    assert torch.equal(outputs[1], outputs[0])
    assert torch.equal(outputs[2], outputs[0])
    # Every token selected at the first step: the dense model at bfloat16's tolerance.
    with torch.no_grad():
        dense = vit(video[0])
    assert torch.allclose(outputs[0][0], dense, atol=0.1, rtol=0.05)
