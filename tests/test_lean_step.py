"""A block's lean step (`EventfulBlock._lean_forward`) is the general step, bit for bit."""

import copy
import io
import pickle
from dataclasses import replace

import pytest
import torch

import eventful
from eventful.core import block as block_module
from eventful.core import kernels, packed_linear, precision
from eventful.core.fingerprint import forget_weight_caches
from eventful.core.model import EventfulViT
from eventful.models.vit import describe_vit
from eventful.synthetic import moving_squares
from tests.helpers import tiny_vit

needs_kernels = pytest.mark.skipif(
    kernels.exact_attention_update() is None, reason="the CPU kernels could not be built here"
)


def count_blocks_in_one_call(monkeypatch, calls: list[int]) -> None:
    """Adds to calls[0] the blocks that each call of `kernels.blocks_step` steps."""
    kernel = kernels.blocks_step()

    def counted(x, tensors, eps, integers, *args):
        calls[0] += len(eps) // 2  # two LayerNorms' eps per block
        return kernel(x, tensors, eps, integers, *args)

    monkeypatch.setattr(kernels, "blocks_step", lambda: None if kernel is None else counted)


@pytest.fixture
def lean_calls(monkeypatch):
    """How many blocks took the lean step since the fixture started (from Python, in one call
    each, or with the other blocks in one call)."""
    calls = [0]
    lean_forward = block_module.EventfulBlock._lean_forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return lean_forward(self, *args, **kwargs)

    monkeypatch.setattr(block_module.EventfulBlock, "_lean_forward", counted)
    count_blocks_in_one_call(monkeypatch, calls)
    return calls


def run(converted, video, lean, monkeypatch, batch=1, **options):
    """Outputs, op counts and unprocessed shares of a stream over the video."""
    monkeypatch.setattr(block_module, "LEAN_STEPS", lean)
    stream = converted.stream(batch_size=batch, **options)
    outputs, ops, shares = [], [], []
    with torch.inference_mode():
        for frames in video:
            outputs.append(stream(frames[:batch]))
            ops.append(stream.ops)
            shares.append(None if stream.trace is None else stream.trace.unprocessed_share)
    return torch.stack(outputs), ops, shares


@needs_kernels
@pytest.mark.parametrize("level", ["tokenwise", "exact"])
@pytest.mark.parametrize("chosen", ["fp32", "int8", "bf16"])
# TopK(14): at the exact level from exact_dense_from(61) = 13 on, a recompute of every row.
@pytest.mark.parametrize("policy", [eventful.TopK(7), eventful.TopFraction(0.1), eventful.TopK(14)])
@pytest.mark.parametrize("batch", [1, 3])
def test_lean_step_equals_the_general_step(level, chosen, policy, batch, monkeypatch, lean_calls):
    # bf16 is refused where the CPU lacks native bfloat16; the arithmetic is PyTorch's either way.
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    # Frames of 48 x 80 for a model made at 64 x 64: a size other than the model's own.
    vit = tiny_vit()
    converted = eventful.convert(vit, policy=policy, level=level, precision=chosen)
    squares = moving_squares(8, size=80, batch=3, seed=2)
    video = squares[..., 16:64, :]
    general = run(converted, video, False, monkeypatch, batch)
    assert lean_calls[0] == 0
    lean = run(converted, video, True, monkeypatch, batch)
    assert lean_calls[0] == 7 * len(converted.encoder.blocks)  # every step after the first
    assert torch.equal(lean[0], general[0])
    assert lean[1] == general[1]  # the op counts, from the same selections
    for got, want in zip(lean[2], general[2], strict=True):
        assert torch.equal(got, want)


@needs_kernels
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_lean_step_without_a_trace_and_after_copies_and_reloads(context, monkeypatch, lean_calls):
    vit = tiny_vit()
    converted = eventful.convert(vit, policy=eventful.TopK(9), level="exact")
    video = moving_squares(10, size=64, batch=1, seed=3)
    options = {"count_ops": False, "drift": None}
    want = run(converted, video, False, monkeypatch, **options)[0]

    monkeypatch.setattr(block_module, "LEAN_STEPS", True)
    stream = converted.stream(**options)
    with context():
        got = [stream(frames) for frames in video[:4]]
        copied = copy.deepcopy(stream)
        buffer = io.BytesIO()
        torch.save(stream.state_dict(), buffer)
        got += [copied(frames) for frames in video[4:7]]
        reloaded = converted.stream(**options)
        buffer.seek(0)
        reloaded.load_state_dict(torch.load(buffer, weights_only=False))
    assert lean_calls[0] > 0
    with context():
        # The reloaded stream takes over from the state saved after step 4, as the copy did.
        again = [reloaded(frames) for frames in video[4:7]]
        got += [copied(frames) for frames in video[7:]]
    assert torch.equal(torch.stack(got), want)
    assert torch.equal(torch.stack(again), want[4:7])


@needs_kernels
def test_lean_step_stays_out_where_it_does_not_apply(monkeypatch, lean_calls):
    vit = tiny_vit()
    video = moving_squares(4, size=64, batch=1, seed=4)
    monkeypatch.setattr(block_module, "LEAN_STEPS", True)
    cases = {
        "threshold": (eventful.Threshold(0.5), "exact", {}),
        "every token": (eventful.TopK(65), "exact", {}),
        "full level": (eventful.TopK(9), "full", {}),
        "escalation": (
            eventful.TopK(9),
            "exact",
            {"drift": eventful.DriftControl(escalation_bound=0.0)},
        ),
    }
    for name, (policy, level, options) in cases.items():
        stream = eventful.convert(vit, policy=policy, level=level).stream(**options)
        with torch.inference_mode():
            for frames in video:
                stream(frames)
        assert lean_calls[0] == 0, name


@pytest.fixture
def block_step_calls(monkeypatch):
    """How many blocks took their step in one kernel call since the fixture started (their own
    call, or one with the other blocks)."""
    calls = [0]
    kernel = kernels.block_step()

    def counted(*args):
        calls[0] += 1
        return kernel(*args)

    monkeypatch.setattr(kernels, "block_step", lambda: None if kernel is None else counted)
    count_blocks_in_one_call(monkeypatch, calls)
    return calls


@needs_kernels
@pytest.mark.parametrize("chosen", ["fp32", "int8", "bf16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("count_ops", [True, False])
@pytest.mark.parametrize("level", ["tokenwise", "exact"])
@pytest.mark.parametrize("count", [5, 14])
@pytest.mark.parametrize("all_blocks", [True, False])
def test_block_step_in_one_call_equals_the_lean_step(
    level, chosen, batch, count_ops, count, all_blocks, monkeypatch, block_step_calls
):
    # all_blocks: every block's step in one call (`block.steps_in_one_call`), else a call each.
    monkeypatch.setattr(block_module, "BLOCKS_IN_ONE_CALL", all_blocks)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    vit = tiny_vit()
    # 61 tokens per stream. 5 of them: up to 15 rows, which the small-rows kernel takes at every
    # precision (bf16 up to packed_linear.BF16_SMALL_ROWS). 14: at bf16 and batch 3, 42 rows for
    # oneDNN's bfloat16 linear; at the exact level, from exact_dense_from(61) = 13 on, a
    # recompute of every row (in bfloat16 at bf16).
    converted = eventful.convert(vit, policy=eventful.TopK(count), level=level, precision=chosen)
    video = moving_squares(8, size=80, batch=3, seed=5)[..., 16:64, :]
    options = {"count_ops": count_ops, "drift": None}
    monkeypatch.setattr(block_module, "FUSED_BLOCK_STEPS", False)
    want = run(converted, video, True, monkeypatch, batch, **options)
    assert block_step_calls[0] == 0
    monkeypatch.setattr(block_module, "FUSED_BLOCK_STEPS", True)
    got = run(converted, video, True, monkeypatch, batch, **options)
    # Every step after the first; bf16 rows beyond the small-rows kernel need the tiles kernel
    # or oneDNN's bfloat16 linear, which some CPUs lack (PyTorch's linear then runs them, from
    # Python).
    rows_for_onednn = chosen == "bf16" and count * batch > packed_linear.BF16_SMALL_ROWS
    tiles = kernels.tiles_linear() is not None and count * batch >= packed_linear.TILES_MIN_ROWS
    one_call = not rows_for_onednn or packed_linear.PREPACKED_BF16 or tiles
    assert block_step_calls[0] == (7 * len(converted.encoder.blocks) if one_call else 0)
    assert torch.equal(got[0], want[0])
    assert got[1] == want[1]  # the op counts, from the same selections
    for shares, wanted in zip(got[2], want[2], strict=True):
        assert (shares is None) == (wanted is None)
        assert shares is None or torch.equal(shares, wanted)


@needs_kernels
@pytest.mark.parametrize("level", ["tokenwise", "exact"])
def test_block_step_in_one_call_stays_out_where_a_layer_runs_elsewhere(
    level, monkeypatch, block_step_calls, lean_calls
):
    vit = tiny_vit()
    video = moving_squares(4, size=64, batch=2, seed=6)
    monkeypatch.setattr(block_module, "LEAN_STEPS", True)
    # Too many rows for the small-rows kernel in bfloat16 (2 streams of 10) where neither AMX
    # tiles nor oneDNN's bfloat16 linear are there (PyTorch's linear multiplies them), and a
    # GELU the kernels do not compute (tanh's).
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    monkeypatch.setattr(packed_linear, "PREPACKED_BF16", False)
    monkeypatch.setattr(kernels, "tiles_linear", lambda: None)
    many_rows = eventful.convert(vit, policy=eventful.TopK(10), level=level, precision="bf16")
    description = describe_vit(vit)
    tanh_gelu = torch.nn.GELU(approximate="tanh")
    tanh_blocks = [replace(b, activation=tanh_gelu) for b in description.blocks]
    tanh = EventfulViT(replace(description, blocks=tuple(tanh_blocks)), eventful.TopK(9), level)
    for converted, batch in ((many_rows, 2), (tanh, 1)):
        stream = converted.stream(batch_size=batch)
        with torch.inference_mode():
            for frames in video[:, :batch]:
                stream(frames)
        assert lean_calls[0] > 0  # each took the lean step, from Python
        lean_calls[0] = 0
    assert block_step_calls[0] == 0


def tapped_run(converted, video, batch: int, **options):
    """Final and tapped outputs, op counts and unprocessed shares of a stream over the video."""
    stream = converted.stream(batch_size=batch, **options)
    finals, tapped, ops, shares = [], [], [], []
    with torch.inference_mode():
        for frames in video:
            final, taps = stream(frames[:batch])
            finals.append(final)
            tapped.append(torch.stack(taps))
            ops.append(stream.ops)
            shares.append(None if stream.trace is None else stream.trace.unprocessed_share)
    return torch.stack(finals), torch.stack(tapped), ops, shares


@needs_kernels
@pytest.mark.parametrize("level", ["tokenwise", "exact", ("exact", "full", "tokenwise")])
@pytest.mark.parametrize("count_ops", [True, False])
@pytest.mark.parametrize("chosen", ["fp32", "bf16"])
def test_blocks_in_one_call_equal_a_call_per_block_with_taps(
    level, count_ops, chosen, monkeypatch, block_step_calls
):
    """Every block's step in one call gives what a call per block gives, bit for bit: the final
    and the tapped outputs, the op counts, the unprocessed shares. Where one block has no
    one-call step (the full level), each block runs on its own."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    description = describe_vit(tiny_vit())
    converted = EventfulViT(description, eventful.TopK(7), level, taps=(3, 0, 1), precision=chosen)
    video = moving_squares(7, size=80, batch=2, seed=11)[..., 16:64, :]
    options = {"count_ops": count_ops, "drift": None}
    in_one_call = {}
    for all_blocks in (False, True):
        monkeypatch.setattr(block_module, "BLOCKS_IN_ONE_CALL", all_blocks)
        all_calls = [0]
        count_blocks_in_one_call(monkeypatch, all_calls)
        in_one_call[all_blocks] = tapped_run(converted, video, 2, **options), all_calls[0]
    (want, none), (got, blocks) = in_one_call[False], in_one_call[True]
    assert none == 0
    assert blocks == (0 if isinstance(level, tuple) else 6 * len(converted.encoder.blocks))
    assert block_step_calls[0] > 0
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])  # the embedding's, then blocks 1 and 3's outputs
    assert got[2] == want[2]
    for shares, wanted in zip(got[3], want[3], strict=True):
        assert (shares is None) == (wanted is None)
        assert shares is None or torch.equal(shares, wanted)


@needs_kernels
def test_a_forward_hook_on_a_block_runs_at_every_step(monkeypatch, block_step_calls):
    """A block with a forward hook runs its own step, so that the hook sees it; the outputs are
    those of the steps in one call."""
    video = moving_squares(5, size=64, batch=1, seed=12)

    def outputs(hooked: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        converted = eventful.convert(tiny_vit(), policy=eventful.TopK(6), level="exact")
        seen = []
        if hooked:
            hook = lambda module, args, output: seen.append(output.clone())  # noqa: E731
            converted.encoder.blocks[1].register_forward_hook(hook)
        stream = converted.stream(drift=None)
        with torch.inference_mode():
            return torch.stack([stream(frames) for frames in video]), seen

    want, _ = outputs(hooked=False)
    in_one_call = block_step_calls[0]
    got, seen = outputs(hooked=True)
    assert len(seen) == len(video)
    assert block_step_calls[0] - in_one_call == in_one_call  # each block its own call now
    assert torch.equal(got, want)


@needs_kernels
def test_blocks_step_refuses_what_it_cannot_take_and_leaves_the_state_alone():
    converted = eventful.convert(tiny_vit(), policy=eventful.TopK(5), level="exact")
    stream = converted.stream(drift=None)
    video = moving_squares(2, size=64, batch=1, seed=13)
    with torch.inference_mode():
        for frames in video:
            stream(frames)
    blocks, states = converted.encoder.blocks, stream.state.blocks
    before = [{name: tensor.clone() for name, tensor in state.items()} for state in states]
    x = torch.randn(1, states[0]["qkv"].shape[1], tiny_vit().dim)
    tensors, eps, integers = [], [], []
    with torch.no_grad():
        for block, state in zip(blocks, states, strict=True):
            operands = block.one_call_operands(x, state, converted.encoder.policy, None)
            tensors += operands.tensors
            eps += operands.eps
            integers += operands.integers
    last_missing = [*tensors[:-28], None, *tensors[-27:]]
    depth = len(blocks)
    cases = {
        "per block 28 tensors, 2 eps and 5 integers, got 83": (tensors[:-1], eps, integers, []),
        rf"slot 0 of block {depth - 1}, got None": (last_missing, eps, integers, []),
        rf"taps in \[1, {depth}\], got {depth + 1}": (tensors, eps, integers, [depth + 1]),
    }
    for refused, (given, given_eps, given_integers, taps) in cases.items():
        with torch.no_grad(), pytest.raises(RuntimeError, match=refused):
            kernels.blocks_step()(x, given, given_eps, given_integers, taps, 1e-3, False)
        for state, kept in zip(states, before, strict=True):
            for name, tensor in state.items():
                assert torch.equal(tensor, kept[name]), (refused, name)


@needs_kernels
def test_block_step_refuses_what_it_cannot_take_and_leaves_the_state_alone():
    vit = tiny_vit()
    converted = eventful.convert(vit, policy=eventful.TopK(5), level="exact")
    stream = converted.stream(drift=None)
    video = moving_squares(2, size=64, batch=1, seed=7)
    with torch.inference_mode():
        for frames in video:
            stream(frames)
    converted_block = converted.encoder.blocks[0]
    state = stream.state.blocks[0]
    before = {name: tensor.clone() for name, tensor in state.items()}
    num_tokens = state["qkv"].shape[1]
    x = torch.randn(1, num_tokens, vit.dim)
    layers = [converted_block.qkv, converted_block.proj, converted_block.fc1, converted_block.fc2]
    weights = []
    with torch.no_grad():
        for layer in layers:
            operands = layer.step_operands(num_tokens)
            weights += [operands.weight, operands.bias, operands.scale]
    norms = [converted_block.norm1.weight, converted_block.norm1.bias, 1e-6] * 2
    sums = [state[name] for name in block_module.CACHES["exact"]]
    half_sums = [sums[0].half(), *sums[1:]]
    cases = {
        rf"count in \[1, {num_tokens}\), got {num_tokens}": (num_tokens, sums, False),
        "the three running sums .* or none .*, got 2": (5, [*sums[:2], None], False),
        # A recompute in bfloat16 (5 changed tokens from dense_from 2 on) checks the sums first.
        "numerator as a contiguous float32 tensor": (5, half_sums, True),
    }
    for refused, (count, given_sums, bfloat16_attention) in cases.items():
        with torch.no_grad(), pytest.raises(RuntimeError, match=refused):
            kernels.block_step()(
                x,
                *(state[name] for name in block_module.STEP_STATE),
                *given_sums,
                *(state[f"{name}_scale"] for name in block_module.GATES),
                *norms,
                *weights,
                converted_block.fc1.out_features,
                count,
                converted_block.heads,
                2 if bfloat16_attention else num_tokens,
                1e-3,
                bfloat16_attention,
                False,
            )
        for name, tensor in state.items():
            assert torch.equal(tensor, before[name]), (refused, name)


@needs_kernels
@pytest.mark.parametrize("level", ["tokenwise", "exact"])
def test_block_step_in_one_call_follows_changed_weights_copies_and_reloads(
    level, monkeypatch, block_step_calls
):
    """The one-call step keeps its layers' operands between steps
    (`EventfulBlock._block_step_weights`); a weight changed in place, a bias replaced, a copy
    and a pickle each give what the step from Python gives."""
    video = moving_squares(9, size=64, batch=1, seed=8)

    def outputs(fused: bool) -> torch.Tensor:
        monkeypatch.setattr(block_module, "FUSED_BLOCK_STEPS", fused)
        converted = eventful.convert(tiny_vit(), policy=eventful.TopK(6), level=level)
        stream = converted.stream(drift=None)
        first = converted.encoder.blocks[0]
        got = []
        with torch.inference_mode():
            got += [stream(frames) for frames in video[:3]]
        with torch.no_grad():
            first.fc1.weight.mul_(1.5)  # in place: the weight's version moves
            first.proj.bias = torch.nn.Parameter(first.proj.bias + 0.25)  # a new tensor
        with torch.inference_mode():
            got += [stream(frames) for frames in video[3:5]]
            got += [copy.deepcopy(stream)(frames) for frames in video[5:6]]
        buffer = io.BytesIO()
        torch.save(converted, buffer)
        buffer.seek(0)
        reloaded = torch.load(buffer, weights_only=False)
        assert all(block._step_weights is None for block in reloaded.encoder.blocks)
        again = reloaded.stream(drift=None)
        with torch.inference_mode():
            got += [again(frames) for frames in video[:4]]
        return torch.stack(got)

    want = outputs(fused=False)
    assert block_step_calls[0] == 0
    got = outputs(fused=True)
    assert block_step_calls[0] > 0
    assert torch.equal(got, want)


@needs_kernels
def test_a_bf16_one_call_step_follows_a_bias_changed_in_place(monkeypatch, block_step_calls):
    """oneDNN's bfloat16 layers take a rounded copy of the bias, which the one-call step keeps:
    a bias changed in place must reach it (`EventfulBlock._block_step_weights`)."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    monkeypatch.setattr(kernels, "tiles_linear", lambda: None)  # oneDNN's layers, 40 rows
    video = moving_squares(6, size=64, batch=2, seed=10)

    def outputs(fused: bool) -> torch.Tensor:
        monkeypatch.setattr(block_module, "FUSED_BLOCK_STEPS", fused)
        vit = tiny_vit()
        converted = eventful.convert(vit, policy=eventful.TopK(20), level="exact", precision="bf16")
        stream = converted.stream(batch_size=2, drift=None)
        first = converted.encoder.blocks[0]
        got = []
        with torch.inference_mode():
            got += [stream(frames) for frames in video[:3]]
        with torch.no_grad():
            first.fc2.bias.add_(0.5)  # in place: the same tensor, new values
        with torch.inference_mode():
            got += [stream(frames) for frames in video[3:]]
        return torch.stack(got)

    want = outputs(fused=False)
    assert block_step_calls[0] == 0
    got = outputs(fused=True)
    if packed_linear.PREPACKED_BF16:
        assert block_step_calls[0] > 0
    assert torch.equal(got, want)


@needs_kernels
def test_kept_operands_of_the_blocks_in_one_call_follow_every_change_between_steps(monkeypatch):
    """A stream keeps its operands of the blocks in one call between steps
    (`block.KeptOperands`); each change below must reach the next step as it reaches the steps
    of a call per block, which ask the blocks anew, and no step without a change may make them
    anew. A weight made in inference mode has no version counter: its change in place reaches
    the step through `forget_weight_caches`."""
    video = moving_squares(16, size=64, batch=1, seed=21)
    donor = eventful.convert(tiny_vit(), policy=eventful.TopK(6), level="exact")
    with torch.no_grad():
        for parameter in donor.parameters():
            parameter.mul_(0.9)

    def outputs(all_blocks: bool) -> tuple[torch.Tensor, list[bool]]:
        monkeypatch.setattr(block_module, "BLOCKS_IN_ONE_CALL", all_blocks)
        converted = eventful.convert(tiny_vit(), policy=eventful.TopK(6), level="exact")
        blocks = converted.encoder.blocks
        stream = converted.stream(drift=None)
        frames = iter(video)
        got, made_anew = [], []

        def step(grad_mode=torch.inference_mode, call=stream) -> None:
            before = stream.state.kept_operands
            with grad_mode():
                got.append(call(next(frames)))
            kept = stream.state.kept_operands
            dense_step = len(got) == 1
            assert isinstance(kept, block_module.KeptOperands) == (all_blocks and not dense_step)
            made_anew.append(kept is not before)

        def changed(change, grad_mode=torch.no_grad) -> None:
            with grad_mode():
                change()

        for _ in range(3):
            step()
        changed(lambda: setattr(blocks[0].norm1, "eps", 1e-3))
        step()
        replacement = copy.deepcopy(blocks[1].fc2)
        changed(lambda: replacement.weight.mul_(1.5))
        changed(lambda: setattr(blocks[1], "fc2", replacement))
        step()
        norm = blocks[0].norm2
        changed(lambda: setattr(norm, "weight", torch.nn.Parameter(torch.rand_like(norm.weight))))
        step()
        changed(lambda: blocks[1].qkv.weight.add_(0.01))  # in place: its version moves
        step()
        weight = blocks[1].fc1.weight
        changed(lambda: setattr(weight, "data", weight.data * 1.1))  # the same tensor, new memory
        step()
        changed(lambda: converted.load_state_dict(donor.state_dict()))
        step()
        with torch.inference_mode():
            made_in_inference_mode = blocks[0].fc1.weight.clone()
        blocks[0].fc1.weight = torch.nn.Parameter(made_in_inference_mode, requires_grad=False)
        step()
        changed(lambda: blocks[0].fc1.weight.mul_(1.25), torch.inference_mode)
        forget_weight_caches(converted)
        step()
        converted.policy = eventful.TopK(4)
        step()
        step()
        # Stepped by the model itself outside inference mode (a stream's steps run inside it),
        # the caches made in inference mode become ordinary tensors.
        step(torch.no_grad, lambda frames: converted(frames, stream.state))
        snapshot = stream.state_dict()
        step()
        stream.load_state_dict(snapshot)
        step()
        # Copies and pickles of the stream make their operands anew (they hold the weights).
        assert copy.deepcopy(stream).state.kept_operands is None
        assert pickle.loads(pickle.dumps(stream.state)).kept_operands is None
        return torch.stack(got), made_anew

    want, _ = outputs(all_blocks=False)
    got, made_anew = outputs(all_blocks=True)
    assert torch.equal(got, want)
    # Made on the second step (the first is dense), after each change, and kept otherwise.
    # The changes: eps, fc2, norm2's weight, qkv's weight, fc1's weight's memory, the state
    # dict, fc1's weight made in inference mode and then changed in it; the policy; the model's
    # own step under no_grad; the snapshot.
    expected = [False, True, False, *[True] * 8, True, False, True, False, True]
    assert made_anew == expected
