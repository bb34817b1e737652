"""The engine's CPU kernels against the same arithmetic in PyTorch operators, and the rules that
choose between them: the exact level's swap of old for new key contributions
(`kernels.swap_key_contributions`), a gate's error norms (`kernels.gate_error_norms`),
softmax attention of query rows (`kernels.attention_rows`), a transposing copy
(`kernels.transposed`) and the exact level's whole step over each stream's sequence
(`kernels.exact_attention_update`). The small-rows linear kernel is tested with `PackedLinear`
(test_packed_linear.py) and in the heads' sparse stages (test_local_head.py)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eventful
from eventful.core import attention, gates, kernels, local_head
from eventful.core.policies import TopK
from eventful.core.selection import Selection
from eventful.synthetic import moving_squares
from tests.helpers import assert_equal_up_to_rounding, kernel_calls, two_streams_over

needs_kernel = pytest.mark.skipif(
    kernels.swap_key_contributions() is None, reason="the CPU kernels could not be built here"
)
needs_norms_kernel = pytest.mark.skipif(
    kernels.gate_error_norms() is None, reason="the CPU kernels could not be built here"
)
needs_attention_kernel = pytest.mark.skipif(
    kernels.attention_rows() is None, reason="the CPU kernels could not be built here"
)


def attention_state(groups, heads, length, dh, count, bias, dtype=torch.float32, seed=0):
    """Running sums of attention over `length` keys, then `count` of those keys changed:
    (sums, q, (new keys, new values, old keys, old values, columns bias), (k, v) after)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    q = normal(groups, heads, length, dh) / 3
    k = normal(groups, heads, length, dh)
    v = normal(groups, heads, length, dh)
    logits = q @ k.transpose(-1, -2)
    full_bias = normal(groups, heads, length, length) if bias else None
    if bias:
        logits = logits + full_bias
    shift = logits.amax(dim=-1)
    weights = (logits - shift.unsqueeze(-1)).exp()
    sums = [weights @ v, weights.sum(dim=-1), shift]
    positions = torch.randperm(length, generator=generator)[:count]
    old_keys, old_values = k[:, :, positions], v[:, :, positions]
    new_keys, new_values = normal(groups, heads, count, dh), normal(groups, heads, count, dh)
    columns_bias = full_bias[..., positions].contiguous() if bias else None
    k, v = k.clone(), v.clone()
    k[:, :, positions], v[:, :, positions] = new_keys, new_values
    changed = (new_keys, new_values, old_keys, old_values, columns_bias)
    return sums, q, changed, (k, v)


def torch_swap(sums, q, changed):
    sums = [s.clone() for s in sums]
    with kernel_calls("swap_key_contributions", use=False):
        attention._swap_key_contributions(*sums, q, *changed)
    return sums


def kernel_swap(sums, q, changed):
    sums = [s.clone() for s in sums]
    kernels.swap_key_contributions()(*sums, q, *changed)
    return sums


@needs_kernel
@pytest.mark.parametrize(
    "groups, heads, length, dh, count",
    [
        (1, 6, 257, 64, 16),
        (1, 12, 65, 64, 1),
        (3, 2, 50, 20, 5),
        (2, 4, 33, 7, 11),
        (1, 1, 9, 8, 9),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_equals_the_pytorch_operators(groups, heads, length, dh, count, bias):
    sums, q, changed, _ = attention_state(groups, heads, length, dh, count, bias)
    for ours, theirs in zip(
        kernel_swap(sums, q, changed), torch_swap(sums, q, changed), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)


@needs_kernel
def test_after_the_swap_the_sums_give_the_attention_over_the_new_keys():
    sums, q, changed, (k, v) = attention_state(1, 3, 40, 16, 6, bias=False)
    numerator, denominator, _ = kernel_swap(sums, q, changed)
    expected = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    torch.testing.assert_close(
        numerator / denominator.unsqueeze(-1), expected, rtol=1e-4, atol=1e-5
    )


@needs_kernel
@pytest.mark.parametrize("dh", [20, 24, 64])
def test_a_row_does_not_depend_on_the_rows_beside_it(dh):
    # 37 rows: the last one is processed alone, among 70 beside the row after it.
    sums, q, changed, _ = attention_state(1, 2, 70, dh, 9, bias=False)
    whole = kernel_swap(sums, q, changed)
    first = kernel_swap([s[:, :, :37].contiguous() for s in sums], q[:, :, :37], changed)
    for all_rows, some_rows in zip(whole, first, strict=True):
        assert torch.equal(all_rows[:, :, :37], some_rows)  # same row: bit for bit


@needs_kernel
def test_q_may_be_a_strided_view_of_the_qkv_rows():
    sums, q, changed, _ = attention_state(1, 4, 30, 16, 5, bias=False)
    qkv = torch.randn(1, 30, 3, 4, 16)
    qkv[:, :, 0] = q.transpose(1, 2)
    view = qkv[:, :, 0].transpose(1, 2)  # (1, H, L, dh), rows 3 H dh apart
    assert not view.is_contiguous()
    for strided, plain in zip(
        kernel_swap(sums, view, changed), kernel_swap(sums, q, changed), strict=True
    ):
        assert torch.equal(strided, plain)


@needs_kernel
def test_the_kernel_refuses_what_it_cannot_read_and_names_it():
    sums, q, changed, _ = attention_state(1, 2, 10, 8, 3, bias=False)
    with pytest.raises(RuntimeError, match="numerator as a float32 CPU tensor"):
        kernels.swap_key_contributions()(sums[0].double(), *sums[1:], q, *changed)
    with pytest.raises(RuntimeError, match=r"old_keys of shape \[1, 2, 3, 8\]"):
        kernels.swap_key_contributions()(
            *sums, q, *changed[:2], changed[2][:, :, :2].contiguous(), *changed[3:]
        )


def test_the_pytorch_operators_run_where_the_kernel_does_not_apply():
    sums, q, changed, _ = attention_state(1, 2, 12, 8, 3, bias=True, dtype=torch.float64)
    assert attention._swap_kernel(*sums, q, *changed) is None  # float64
    float_sums = [s.float() for s in sums]
    float_changed = [t.float() for t in changed]
    q32 = q.float().requires_grad_()
    with torch.enable_grad():
        assert attention._swap_kernel(*float_sums, q32, *float_changed) is None  # autograd
    with torch.no_grad():
        inputs = (*float_sums, q32, *float_changed)
        assert attention._swap_kernel(*inputs) is kernels.swap_key_contributions()
        transposed = float_sums[0].transpose(-1, -2).contiguous().transpose(-1, -2)
        assert attention._swap_kernel(transposed, *float_sums[1:], q32, *float_changed) is None
    attention._swap_key_contributions(*sums, q, *changed)  # float64: PyTorch's operators
    assert all(s.dtype == torch.float64 and torch.isfinite(s).all() for s in sums)


@needs_norms_kernel
@pytest.mark.parametrize("shape", [(1, 257, 384), (3, 50, 768), (2, 7, 5), (1, 1, 33)])
def test_the_error_norms_equal_the_norms_of_the_difference(shape):
    torch.manual_seed(0)
    current, reference = torch.randn(shape), torch.randn(shape)
    norms = kernels.gate_error_norms()(current, reference)
    want = torch.linalg.vector_norm(current - reference, dim=-1)
    torch.testing.assert_close(norms, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(norms, kernels.gate_error_norms()(current.clone(), reference.clone()))
    assert torch.equal(kernels.gate_error_norms()(current, current), torch.zeros(shape[:2]))


@needs_norms_kernel
def test_the_error_norms_of_a_token_do_not_depend_on_the_batch_beside_it():
    torch.manual_seed(0)
    current, reference = torch.randn(4, 20, 48), torch.randn(4, 20, 48)
    batch = kernels.gate_error_norms()(current, reference)
    one = kernels.gate_error_norms()(current[2:3].contiguous(), reference[2:3].contiguous())
    assert torch.equal(batch[2:3], one)


@needs_norms_kernel
def test_a_gate_selects_the_same_tokens_with_or_without_the_kernel():
    torch.manual_seed(0)
    current = torch.randn(2, 30, 16)
    results = []
    for use_kernel in (True, False):
        torch.manual_seed(1)
        reference, scale = torch.randn(2, 30, 16), torch.ones(2)
        real = kernels.gate_error_norms
        kernels.gate_error_norms = real if use_kernel else (lambda: None)
        try:
            step = gates.token_gate(current, reference, scale, TopK(7), [], measure=True)
        finally:
            kernels.gate_error_norms = real
        results.append((step, reference))
    (ours, our_reference), (theirs, their_reference) = results
    assert [i.sort().values.tolist() for i in ours.selection.per_stream] == [
        i.sort().values.tolist() for i in theirs.selection.per_stream
    ]
    assert torch.equal(our_reference, their_reference)
    torch.testing.assert_close(ours.unprocessed, theirs.unprocessed, rtol=1e-5, atol=1e-7)


def test_the_error_norms_fall_back_to_pytorch_where_the_kernel_does_not_apply():
    torch.manual_seed(0)
    current, reference = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    want = torch.linalg.vector_norm(current - reference, dim=-1)
    strided = current.transpose(0, 1).contiguous().transpose(0, 1)
    for args in [
        (current.double(), reference.double(), 2),  # float64
        (strided, reference, 2),  # not contiguous
    ]:
        assert not gates._one_pass_applies(*args[:2])
        torch.testing.assert_close(gates.error_norms_of(*args).float(), want)
    l1 = gates.error_norms_of(current, reference, 1)
    torch.testing.assert_close(l1, (current - reference).abs().sum(-1))
    with torch.enable_grad():
        leaf = current.clone().requires_grad_()
        assert not gates._one_pass_applies(leaf, reference)
        gates.error_norms_of(leaf, reference, 2).sum().backward()
    assert leaf.grad is not None


@needs_norms_kernel
def test_the_error_norms_kernel_refuses_mismatched_shapes_and_names_them():
    with pytest.raises(RuntimeError, match=r"reference \[1, 4, 8\] to have the shape"):
        kernels.gate_error_norms()(torch.randn(1, 5, 8), torch.randn(1, 4, 8))


@needs_norms_kernel
def test_the_unprocessed_share_equals_pytorchs_operators_up_to_rounding():
    torch.manual_seed(0)
    norms = torch.rand(3, 50)
    scale = torch.tensor([0.5, 2.0, 0.0])  # a zero scale is clamped, as gate_size does
    # Ragged selections, in no particular order, a stream with none.
    selection = Selection.from_lists(
        [torch.tensor([7, 3, 40]), torch.tensor([], dtype=torch.long), torch.arange(49, -1, -2)],
        50,
    )
    left = norms.reshape(-1).index_fill(0, selection.flat, 0).view(3, 50)
    want = left.sum(1) / gates.gate_size(scale, 50)
    got = gates.unprocessed_share(norms, selection, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)  # sums in another order
    assert torch.equal(got, kernels.unprocessed_share()(norms.clone(), selection.flat, scale))
    # Where the kernel does not apply (float64), PyTorch's operators give the same share (the
    # zero scale clamped at float64's least normal, whose share float32 cannot hold).
    fallback = gates.unprocessed_share(norms.double(), selection, scale.double())
    torch.testing.assert_close(fallback[:2].float(), want[:2])


@needs_norms_kernel
def test_the_unprocessed_share_kernel_refuses_bad_input_and_names_it():
    norms, scale = torch.rand(2, 5), torch.ones(2)
    share = kernels.unprocessed_share()
    with pytest.raises(RuntimeError, match=r"token indices in \[0, 10\), got 10"):
        share(norms, torch.tensor([10]), scale)
    with pytest.raises(RuntimeError, match=r"scale as a float32 CPU tensor \(2,\)"):
        share(norms, torch.tensor([1]), torch.ones(3))
    with pytest.raises(RuntimeError, match=r"1-D int64"):
        share(norms, torch.tensor([1], dtype=torch.int32), scale)
    with pytest.raises(RuntimeError, match=r"error norms as a contiguous float32"):
        share(norms.t(), torch.tensor([1]), scale)


def _cpu_has_fma() -> bool:
    """Whether this CPU reports FMA (Linux's /proc/cpuinfo flags)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return False
    flags = [line for line in lines if line.startswith("flags")]
    return bool(flags) and "fma" in flags[0].split()


def attention_inputs(groups, heads, rows, length, dh, seed=0):
    """q (G, H, rows, dh) and k, v (G, H, L, dh) as strided views of qkv buffers, as a block
    holds them, with logits of a ViT's range."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(groups, rows, 3, heads, dh, generator=generator)
    keys_values = torch.randn(groups, length, 3, heads, dh, generator=generator)
    q = queries[:, :, 0].transpose(1, 2) / dh**0.5
    return q, keys_values[:, :, 1].transpose(1, 2), keys_values[:, :, 2].transpose(1, 2)


def float64_attention(q, k, v, bias=None):
    logits = q.double() @ k.double().transpose(-1, -2)
    if bias is not None:
        logits = logits + bias.double()
    logsumexp = torch.logsumexp(logits, dim=-1)
    return (logits - logsumexp.unsqueeze(-1)).exp() @ v.double(), logsumexp


@needs_attention_kernel
@pytest.mark.parametrize(
    "groups, heads, rows, length, dh",
    [
        (1, 6, 257, 257, 64),
        (1, 12, 16, 577, 64),
        (3, 2, 7, 50, 20),
        (2, 4, 13, 33, 7),
        (1, 1, 1, 1, 8),
        (2, 3, 6, 9, 80),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_the_attention_kernel_equals_softmax_attention_in_float64(
    groups, heads, rows, length, dh, bias
):
    q, k, v = attention_inputs(groups, heads, rows, length, dh)
    added = torch.randn(groups, heads, rows, length) if bias else None
    output, logsumexp = kernels.attention_rows()(q, k, v, added)
    want_output, want_logsumexp = float64_attention(q, k, v, added)
    assert output.shape == (groups, heads, rows, dh) and logsumexp.shape == (groups, heads, rows)
    torch.testing.assert_close(output.double(), want_output, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(logsumexp.double(), want_logsumexp, rtol=1e-6, atol=2e-6)
    # The heads side by side are a view: (G, rows, H dh) without a copy.
    assert output.transpose(1, 2).is_contiguous()


@needs_attention_kernel
def test_an_attention_row_does_not_depend_on_the_rows_beside_it():
    # Bit for bit where the kernels build with fused multiply-adds (an x86 CPU with FMA, which
    # `vectors.h` then uses for every sum); elsewhere the compiler may round rows in blocks of
    # different sizes differently.
    same = torch.equal if _cpu_has_fma() else torch.allclose
    q, k, v = attention_inputs(2, 3, 20, 40, 24)
    output, logsumexp = kernels.attention_rows()(q, k, v, None)
    for first, last in [(7, 8), (0, 5), (12, 20)]:
        part, part_logsumexp = kernels.attention_rows()(q[:, :, first:last], k, v, None)
        assert same(part, output[:, :, first:last])
        assert same(part_logsumexp, logsumexp[:, :, first:last])
    contiguous = [t.contiguous() for t in (q, k, v)]
    assert torch.equal(kernels.attention_rows()(*contiguous, None)[0], output)


@needs_attention_kernel
def test_a_broadcast_bias_equals_the_same_bias_in_full():
    q, k, v = attention_inputs(2, 4, 10, 30, 16)
    bias = torch.randn(1, 4, 10, 30)
    broadcast = attention.softmax_attention(q, k, v, bias)
    full = attention.softmax_attention(q, k, v, bias.expand(2, 4, 10, 30).contiguous())
    assert torch.equal(broadcast, full)
    torch.testing.assert_close(broadcast, F.scaled_dot_product_attention(q, k, v, bias, scale=1.0))


@needs_attention_kernel
def test_the_attention_kernel_refuses_what_it_cannot_read_and_names_it():
    q, k, v = attention_inputs(1, 2, 5, 9, 8)
    with pytest.raises(RuntimeError, match="expects q as a float32 CPU tensor"):
        kernels.attention_rows()(q.double(), k, v, None)
    with pytest.raises(RuntimeError, match=r"expects k and v of shape \(1, 2, L, 8\)"):
        kernels.attention_rows()(q, k, v[:, :, :4], None)
    with pytest.raises(RuntimeError, match=r"expects the bias of shape \[1, 2, 5, 9\]"):
        kernels.attention_rows()(q, k, v, torch.zeros(1, 2, 5, 8))
    with pytest.raises(RuntimeError, match="at least one key"):
        kernels.attention_rows()(q, k[:, :, :0], v[:, :, :0], None)
    transposed = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(RuntimeError, match=r"expects k as .* contiguous last dimension"):
        kernels.attention_rows()(q, transposed, v, None)


def test_attention_runs_pytorch_where_the_kernel_does_not_apply():
    q, k, v = attention_inputs(1, 2, 6, 11, 8)
    assert attention._attention_rows_kernel(q.double(), k.double(), v.double(), None) is None
    transposed = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert attention._attention_rows_kernel(q, transposed, v, None) is None
    with torch.enable_grad():
        leaf = q.detach().clone().requires_grad_()
        assert attention._attention_rows_kernel(leaf, k, v, None) is None
        out = attention.softmax_attention(leaf, k, v)
        out.sum().backward()
    assert leaf.grad is not None
    with torch.no_grad():
        assert attention._attention_rows_kernel(q, k, v, None) is kernels.attention_rows()
    for dtype in (torch.float64, torch.float32):
        args = [t.to(dtype) for t in (q, k, v)]
        output, logsumexp = attention.attention_with_logsumexp(*args)
        want, want_logsumexp = float64_attention(*args)
        torch.testing.assert_close(output.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logsumexp.double(), want_logsumexp, rtol=1e-5, atol=1e-6)


needs_transpose_kernel = pytest.mark.skipif(
    kernels.transposed() is None, reason="the CPU kernels could not be built here"
)


@needs_transpose_kernel
@pytest.mark.parametrize(
    "shape",
    # Many rows of few columns and the reverse (channels last to first and back), partial tiles
    # of rows and of columns in a batch, blocks smaller than the registers' 8 x 8, nothing.
    [(1, 16384, 64), (1, 64, 16384), (2, 70, 300), (2, 37, 13), (3, 8, 8), (1, 1, 5), (2, 0, 4)],
)
def test_the_transposing_copy_equals_pytorchs(shape):
    x = torch.randn(shape)
    out = kernels.transposed()(x)
    assert out.is_contiguous() and torch.equal(out, x.transpose(1, 2))
    strided = torch.randn(shape[0], shape[1], shape[2] + 3)[..., 2 : 2 + shape[2]]
    assert torch.equal(kernels.transposed()(strided), strided.transpose(1, 2))


@needs_transpose_kernel
def test_the_transposing_copy_refuses_what_it_cannot_read_and_names_it():
    with pytest.raises(RuntimeError, match=r"float32 CPU tensor \(B, R, C\).*Double"):
        kernels.transposed()(torch.randn(1, 4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        kernels.transposed()(torch.randn(1, 4, 6).transpose(1, 2))


def test_a_heads_caches_take_the_layout_of_pytorchs_copies():
    x = torch.randn(2, 5, 3, 4)
    rows = local_head.flat_copy(x)
    assert torch.equal(rows, x.permute(0, 2, 3, 1).reshape(-1, 5)) and rows.is_contiguous()
    back = local_head.channels_first_copy(rows, tuple(x.shape))
    assert torch.equal(back, x) and back.is_contiguous()
    assert back.data_ptr() != rows.data_ptr()
    assert local_head._transpose_kernel(x.double()) is None
    with torch.enable_grad():
        assert local_head._transpose_kernel(x.clone().requires_grad_()) is None


needs_exact_step_kernel = pytest.mark.skipif(
    kernels.exact_attention_update() is None, reason="the CPU kernels could not be built here"
)


def exact_streams(policy, use_kernel, frames):
    """Outputs and final state of an exact-level ViT's two streams over `frames`, the whole
    step's attention in one kernel call or in PyTorch's operators; and the kernel's calls. The
    blocks' steps run from Python (`kernels.block_step` would call the kernel from C++)."""
    whole_step_off = kernel_calls("block_step", use=False)
    counted = kernel_calls("exact_attention_update", use_kernel)
    with whole_step_off, counted as calls, torch.inference_mode():
        outputs, stream = two_streams_over("exact", policy, frames)
    return outputs, stream, len(calls)


@needs_exact_step_kernel
@pytest.mark.parametrize(
    "policy, exactly",
    [(eventful.TopK(3), True), (eventful.TopK(20), True), (eventful.Threshold(0.3), False)],
    ids=["few changes", "every row recomputed", "ragged counts"],
)
def test_the_exact_step_kernel_equals_pytorchs_operators(policy, exactly):
    """Bit for bit where the streams change as many tokens each; with ragged counts, PyTorch's
    operators pad every stream's changes to the largest count with unchanged tokens, whose
    shares cancel only up to rounding, while the kernel updates each stream with its own."""
    frames = moving_squares(10, size=48, batch=2, seed=4)
    ours, our_stream, calls = exact_streams(policy, True, frames)
    theirs, their_stream, no_calls = exact_streams(policy, False, frames)
    assert calls == 2 * len(frames) and no_calls == 0  # two blocks, every step
    same = torch.equal if exactly else lambda a, b: assert_equal_up_to_rounding(a, b) or True
    assert all(same(a, b) for a, b in zip(ours, theirs, strict=True))
    blocks = zip(our_stream.state.blocks, their_stream.state.blocks, strict=True)
    for ours_block, theirs_block in blocks:
        for name, tensor in ours_block.items():
            assert same(tensor, theirs_block[name]), name
    assert our_stream.ops.total == their_stream.ops.total


def qkv_of(q, k, v):
    """The qkv rows (1, N, 3 D) of one stream's q, k, v (H, N, dh)."""
    return torch.cat([x.transpose(0, 1).flatten(1) for x in (q, k, v)], dim=1).unsqueeze(0)


@needs_exact_step_kernel
def test_the_exact_step_kernel_recomputes_rows_that_underflowed():
    # The rows of exact_attention's dominant-key test: key 0 dominates every row, then drops.
    q, k = torch.ones(1, 6, 2), torch.zeros(1, 6, 2)
    k[0, 0] = 40.0
    v = torch.arange(12.0).reshape(1, 6, 2)
    sums = [torch.zeros(1, 6, 2), torch.zeros(1, 6), torch.zeros(1, 6)]
    attention.recompute_attention_rows(*sums, q, k, v, torch.arange(6))
    ours = [s.unsqueeze(0).clone() for s in sums]
    qkv = qkv_of(q, k, v)
    old_keys, old_values = k[:, :1].clone(), v[:, :1].clone()
    k[0, 0] = -40.0
    rows = qkv_of(q, k, v)[0, :1].contiguous()
    output, lost = kernels.exact_attention_update()(
        qkv, rows, torch.tensor([0]), *ours, 1, attention.exact_dense_from(6), attention.UNDERFLOW
    )
    index = torch.tensor([0])
    recomputed = attention.update_exact_attention(*sums, q, k, v, old_keys, old_values, index)
    assert lost.tolist() == [recomputed] == [5]  # rows 1..5; row 0 is a changed query
    assert torch.equal(qkv, qkv_of(q, k, v))
    for got, want in zip(ours, sums, strict=True):
        assert torch.equal(got[0], want)
    assert torch.equal(output[0], (sums[0] / sums[1].unsqueeze(-1)).transpose(0, 1).flatten(1))
    dense = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
    torch.testing.assert_close(output[0], dense.transpose(0, 1).flatten(1))


@needs_exact_step_kernel
@pytest.mark.parametrize("changes", [(20, 25), (3, 17)], ids=["around the layout bound", "few"])
def test_the_exact_step_kernel_equals_the_update_of_each_stream_bit_for_bit(changes):
    """Two streams, each with its own count of changed tokens: below the kernel's bound for
    laying out each head's keys (`COPY_VALUES_FROM_ROWS`, 24 rows) the changed rows form their
    logits from the keys in their rows, in one or two vectors of rows (more than 16 rows);
    above it, from the keys laid out by feature. Both equal `update_exact_attention` on each
    stream alone (the rows' kernel), bit for bit."""
    heads, tokens, dh = 2, 131, 24  # dh not a whole number of vectors of either width
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, heads, tokens, dh, generator=generator) for _ in range(3))
    sums = [
        torch.zeros(2, heads, tokens, dh),
        torch.zeros(2, heads, tokens),
        torch.zeros(2, heads, tokens),
    ]
    for b in range(2):
        attention.recompute_attention_rows(
            *(t[b] for t in sums), q[b], k[b], v[b], torch.arange(tokens)
        )
    ours = [t.clone() for t in sums]
    qkv = torch.cat([qkv_of(q[b], k[b], v[b]) for b in range(2)])
    indices, new_rows = [], []
    for b, count in enumerate(changes):
        index = torch.randperm(tokens, generator=generator)[:count].sort().values
        old_keys, old_values = k[b][:, index].clone(), v[b][:, index].clone()
        q[b][:, index] += torch.randn(heads, count, dh, generator=generator)
        k[b][:, index] += torch.randn(heads, count, dh, generator=generator)
        v[b][:, index] += torch.randn(heads, count, dh, generator=generator)
        lost = attention.update_exact_attention(
            *(t[b] for t in sums), q[b], k[b], v[b], old_keys, old_values, index
        )
        assert lost == 0 and count < attention.exact_dense_from(tokens)
        indices.append(index + b * tokens)
        new_rows.append(qkv_of(q[b], k[b], v[b])[0, index])
    output, lost = kernels.exact_attention_update()(
        qkv,
        torch.cat(new_rows).contiguous(),
        torch.cat(indices),
        *ours,
        heads,
        attention.exact_dense_from(tokens),
        attention.UNDERFLOW,
    )
    assert lost.tolist() == [0, 0]
    for got, want in zip(ours, sums, strict=True):
        assert torch.equal(got, want)
    for b in range(2):
        want = (sums[0][b] / sums[1][b].unsqueeze(-1)).transpose(0, 1).flatten(1)
        assert torch.equal(output[b], want)
        dense = torch.softmax(q[b] @ k[b].transpose(1, 2), dim=-1) @ v[b]
        # The swapped sums round otherwise than one softmax (logits here spread over tens).
        torch.testing.assert_close(
            output[b], dense.transpose(0, 1).flatten(1), atol=1e-3, rtol=1e-3
        )


@needs_exact_step_kernel
def test_the_exact_step_kernel_refuses_bad_input_and_names_it_leaving_the_state_as_it_was():
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 10, 3 * 8, generator=generator)
    sums = [torch.randn(2, 2, 10, 4), torch.rand(2, 2, 10) + 1, torch.randn(2, 2, 10)]
    rows = torch.randn(3, 3 * 8, generator=generator)
    before = [t.clone() for t in (qkv, *sums)]
    kernel = kernels.exact_attention_update()

    valid_index = torch.tensor([1, 12, 15])

    def call(rows=rows, index=valid_index, heads=2, qkv=qkv, sums=sums):
        return kernel(qkv, rows, index, *sums, heads, 2, 1e-3)

    cases = [
        ({"index": torch.tensor([1, 20, 15])}, r"stream by stream, got 20"),
        ({"index": torch.tensor([12, 1, 15])}, r"stream by stream, got 1 after stream 1"),
        ({"index": torch.tensor([1, 1, 15])}, r"distinct token indices, got 1 twice"),
        ({"index": torch.tensor([1, -3, 15])}, r"got -3"),
        ({"index": torch.tensor([1, 12])}, r"rows of shape \[2, 24\], got \[3, 24\]"),
        ({"index": torch.tensor([1.0, 12.0, 15.0])}, r"index as a 1-D int64"),
        ({"rows": rows.double()}, r"rows as a contiguous float32"),
        ({"heads": 3}, r"heads to divide the model width 8, got 3"),
        ({"sums": [sums[0][:, :, :9].clone(), *sums[1:]]}, r"numerator of shape \[2, 2, 10, 4\]"),
    ]
    for arguments, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**arguments)
        for tensor, was in zip((qkv, *sums), before, strict=True):
            assert torch.equal(tensor, was)
    output, lost = call()  # the same state takes a valid step
    assert output.shape == (2, 10, 8) and lost.shape == (2,)


def test_the_exact_step_runs_pytorchs_operators_where_its_kernel_does_not_apply():
    qkv = torch.randn(1, 10, 24)
    sums = [torch.randn(1, 2, 10, 4), torch.ones(1, 2, 10), torch.zeros(1, 2, 10)]
    rows, index = torch.randn(1, 24), torch.tensor([3])
    double = [t.double() for t in (qkv, rows, *sums)]
    assert attention.update_exact_sequences(*double[:2], index, *double[2:], heads=2) is None
    strided = qkv.transpose(1, 2).contiguous().transpose(1, 2)
    assert attention.update_exact_sequences(strided, rows, index, *sums, heads=2) is None
    with torch.enable_grad():
        graded = rows.clone().requires_grad_()
        assert attention.update_exact_sequences(qkv, graded, index, *sums, heads=2) is None


needs_rows_kernels = pytest.mark.skipif(
    kernels.commit_rows() is None, reason="the CPU kernels could not be built here"
)


@needs_rows_kernels
def test_a_gates_rows_and_a_token_buffers_update_equal_pytorchs_operators_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    current, reference, buffer = (torch.randn(2, 9, 20, generator=generator) for _ in range(3))
    flat = torch.tensor([0, 4, 8, 10, 17])
    selection = Selection.from_lists([flat[:3], flat[3:] - 9], 9)
    with torch.inference_mode():
        theirs_reference = reference.clone()
        theirs = gates.gather_rows(current, selection)
        gates.write_rows(theirs_reference, selection, theirs)
        ours = kernels.commit_rows()(current, reference, flat)
        assert torch.equal(ours, theirs) and torch.equal(reference, theirs_reference)
        rows, x = torch.randn(5, 20, generator=generator), torch.randn(2, 9, 20)
        theirs_buffer = buffer.clone()
        gates.write_rows(theirs_buffer, selection, rows)
        ours = kernels.add_rows()(x, buffer, flat, rows)
        assert torch.equal(ours, x + theirs_buffer) and torch.equal(buffer, theirs_buffer)


@needs_rows_kernels
def test_the_rows_kernels_refuse_bad_input_and_name_it_leaving_the_state_as_it_was():
    current, reference, buffer = torch.randn(1, 6, 8), torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    before = [t.clone() for t in (reference, buffer)]
    cases = [
        (lambda: kernels.commit_rows()(current, reference, torch.tensor([2, 6])), r"got 6"),
        (lambda: kernels.commit_rows()(current, reference, torch.tensor([-1])), r"got -1"),
        (
            lambda: kernels.commit_rows()(current, reference[:, :5].clone(), torch.tensor([1])),
            r"reference \[1, 5, 8\] to have the shape of the gate input \[1, 6, 8\]",
        ),
        (
            lambda: kernels.commit_rows()(current.double(), reference, torch.tensor([1])),
            r"current as a contiguous float32",
        ),
        (
            lambda: kernels.add_rows()(current, buffer, torch.tensor([1, 2]), torch.randn(3, 8)),
            r"rows as a contiguous float32 CPU tensor of shape \[2, 8\], got Float of shape "
            r"\[3, 8\]",
        ),
        (
            lambda: kernels.add_rows()(current, buffer, torch.tensor([9]), torch.randn(1, 8)),
            r"flat token indices in \[0, 6\), got 9",
        ),
        (
            lambda: kernels.add_rows()(current, buffer, torch.tensor([1.0]), torch.randn(1, 8)),
            r"index as a contiguous 1-D int64",
        ),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
        assert torch.equal(reference, before[0]) and torch.equal(buffer, before[1])


def test_a_gate_and_a_buffer_run_pytorchs_operators_where_the_rows_kernels_do_not_apply():
    current, reference, buffer = (torch.randn(1, 6, 8, dtype=torch.float64) for _ in range(3))
    selection = Selection.from_indices(torch.tensor([[1, 4]]), 6)
    rows = gates.commit_rows(current, reference, selection)
    assert torch.equal(rows, current[0, [1, 4]]) and torch.equal(reference[0, [1, 4]], rows)
    new = torch.randn(2, 8, dtype=torch.float64)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    y = gates.add_rows(x, buffer, selection, new)
    assert torch.equal(buffer[0, [1, 4]], new) and torch.equal(y, x + buffer)


@needs_rows_kernels
@pytest.mark.parametrize("affine", [True, False])
def test_a_gates_rows_through_its_layer_norm_equal_pytorchs_up_to_rounding(affine):
    generator = torch.Generator().manual_seed(1)
    current, reference = torch.randn(2, 9, 37, generator=generator), torch.zeros(2, 9, 37)
    norm = torch.nn.LayerNorm(37, eps=1e-6, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(generator=generator)
            norm.bias.normal_(generator=generator)
    selection = Selection.from_lists([torch.tensor([0, 5]), torch.tensor([3, 4, 8])], 9)
    with torch.inference_mode():
        assert gates.fused_layer_norm(norm, current) is not None
        rows = gates.commit_rows(current, reference, selection, norm)
        want = norm(gates.gather_rows(current, selection))
        assert gates.fused_layer_norm(torch.nn.LayerNorm(36), current) is None  # not the features
        assert gates.fused_layer_norm(torch.nn.Identity(), current) is None
    torch.testing.assert_close(rows, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(reference.view(-1, 37)[selection.flat], current.view(-1, 37)[selection.flat])
    if affine:  # parameters that record gradients: the norm runs on its own
        assert gates.fused_layer_norm(norm, current) is None


@needs_rows_kernels
def test_the_rows_kernels_layer_norm_refuses_what_it_cannot_use_and_names_it():
    current, reference, index = torch.randn(1, 6, 8), torch.randn(1, 6, 8), torch.tensor([1])
    with pytest.raises(RuntimeError, match=r"norm's weight as 8 contiguous float32"):
        kernels.commit_rows()(current, reference, index, torch.ones(7), None, 1e-5)
    with pytest.raises(RuntimeError, match=r"eps >= 0 \(0: no normalisation\), got -1"):
        kernels.commit_rows()(current, reference, index, None, None, -1.0)
    with pytest.raises(RuntimeError, match=r"weight or bias only with eps > 0"):
        kernels.commit_rows()(current, reference, index, torch.ones(8), None, 0.0)
