"""The eventful ViT: weights only; every cache lives in a `StreamState` passed to each step."""

from __future__ import annotations

import copy
import functools
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from eventful.core.block import LEVELS, EventfulBlock, steps_in_one_call
from eventful.core.description import EncoderDescription
from eventful.core.drift import DEFAULT_DRIFT, DriftControl
from eventful.core.escalation import Escalation
from eventful.core.fingerprint import forget_weight_caches
from eventful.core.kv_pooling import check_factor, check_pooling
from eventful.core.ops import StepTrace
from eventful.core.packed_linear import LAYER_PRECISIONS, compute_dtype
from eventful.core.policies import Policy
from eventful.core.precision import autocast_dtype
from eventful.core.reduction import Restricted, TokenReduction
from eventful.core.state import StreamState

if TYPE_CHECKING:
    from eventful.core.estimate import FidelityEstimate
    from eventful.core.stream import Stream


def _levels_for(level: str | Sequence[str], depth: int) -> list[str]:
    levels = [level] * depth if isinstance(level, str) else list(level)
    if len(levels) != depth:
        raise ValueError(f"expected one level or {depth} levels (one per block), got {len(levels)}")
    for name in levels:
        if name not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {name!r}")
    return levels


_STEP_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_STEP_LOCKS_GUARD = threading.Lock()


def step_lock(model: EventfulModule) -> threading.RLock:
    """The lock every step of `model` holds: streams of one model stepped from several threads
    take turns, each getting what it would alone (a step keeps per-step values in the model's
    modules, and the policy is shared). Kept beside the model, so copies get their own."""
    encoder = model.encoder
    with _STEP_LOCKS_GUARD:
        lock = _STEP_LOCKS.get(encoder)
        if lock is None:
            lock = _STEP_LOCKS[encoder] = threading.RLock()
    return lock


def locked_step(forward: Callable) -> Callable:
    """`forward` of a converted model, holding the model's `step_lock` while it runs."""

    @functools.wraps(forward)
    def locked(model: EventfulModule, *args: object, **kwargs: object) -> object:
        with step_lock(model):
            return forward(model, *args, **kwargs)

    return locked


def check_frame_tensor(frames: object, weight: Tensor) -> None:
    """What any step asks of its frames before reading them (drift control reads them before
    the model does): a tensor on the device and in the dtype of the model's `weight`."""
    if not isinstance(frames, Tensor):
        raise TypeError(f"expected frames as a torch.Tensor, got {type(frames).__name__}")
    if frames.device != weight.device:
        raise ValueError(
            f"frames are on {frames.device}, but the model is on {weight.device}; move one of them"
        )
    if frames.dtype != weight.dtype:
        fix = (
            "scale the pixels to floats as the model's preprocessing expects"
            if not frames.dtype.is_floating_point
            else f"convert them with frames.to({weight.dtype})"
        )
        raise ValueError(
            f"frames have dtype {frames.dtype}, but the model has dtype {weight.dtype}; {fix}"
        )


def _weights_loaded(module: nn.Module, incompatible_keys: object) -> None:
    forget_weight_caches(module)


class EventfulModule(nn.Module):
    """What every converted model offers: an eventful `encoder`, new states and streams.

    Call it as `model(frames, state)`; `model.stream(batch_size)` wraps a state for the usual
    one-call-per-step loop. `load_state_dict` forgets what was computed from the old weights
    (`forget_weight_caches`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_load_state_dict_post_hook(_weights_loaded)

    @property
    def encoder(self) -> EventfulViT:
        raise NotImplementedError

    @property
    def levels(self) -> list[str]:
        return [block.level for block in self.encoder.blocks]

    @property
    def precision(self) -> str:
        """The arithmetic of the encoder's linear layers: "fp32", "bf16" or "int8"."""
        return self.encoder._precision

    def new_state(self, batch_size: int = 1) -> StreamState:
        """Empty caches for `batch_size` independent streams; the first step fills them."""
        return StreamState(batch_size)

    def stream(
        self,
        batch_size: int = 1,
        count_ops: bool = True,
        check_finite: bool = True,
        compile: bool = False,
        drift: DriftControl | None = DEFAULT_DRIFT,
        clock: Callable[[], float] = time.perf_counter,
        estimate: FidelityEstimate | None = None,
    ) -> Stream:
        """A stateful wrapper over a new state: `y = stream(frames)`, one call per time step.

        See `Stream` for the arguments."""
        from eventful.core.stream import Stream

        return Stream(self, batch_size, count_ops, check_finite, compile, drift, clock, estimate)


class EventfulViT(EventfulModule):
    """An eventful copy of a described encoder (`EncoderDescription`, which each model family's
    adapter produces): frames (B, C, H, W) + state -> final-norm tokens (B, T, D).

    `policy` decides, at every gate, which tokens each stream re-processes; assign a new one
    between steps at will. `level` is one of "tokenwise", "qk", "full", "exact" (the default),
    or one per block. `cache_dtype` (e.g. torch.float16) stores the N x N attention caches of
    the "qk" and "full" levels in half precision: half the memory, at some fidelity cost.
    `taps`: stages (0: the embedding's output, i: block i's output, counted from 1) whose
    tokens the step also returns, in order, as `(final tokens, tapped tokens)`: the multi-scale
    outputs of a detection backbone. `reduction` (None: none), settable at any time, limits the
    tokens the blocks of each of its groups may re-process (`eventful.core.reduction`).
    `gate_reference`, settable at any time: "processed" (the default) measures each token's
    change since it was last processed; "previous" since the previous step, as the STGT gate
    does (a baseline, `eventful.core.gates`). `kv_pooling`, settable at any time: a factor
    by which the patches' keys and values are averaged over the grid in attention (a baseline,
    `eventful.core.kv_pooling`; tokenwise level and global attention only; 1: none).
    `precision`: "fp32", "bf16" or "int8", that of the blocks' linear layers
    (`eventful.core.precision`). Under `torch.autocast`, a step runs its float32 linear layers
    in the autocast dtype and everything else as outside it, so that its caches keep their
    dtype.
    """

    def __init__(
        self,
        description: EncoderDescription,
        policy: Policy,
        level: str | Sequence[str] = "exact",
        cache_dtype: torch.dtype | None = None,
        taps: Sequence[int] = (),
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        description.validate()
        if precision not in LAYER_PRECISIONS:
            raise ValueError(
                f"precision must be one of {LAYER_PRECISIONS} (resolve 'auto' first: "
                f"eventful.core.precision.resolve_precision), got {precision!r}"
            )
        self._precision = precision
        depth = len(description.blocks)
        outside = [stage for stage in taps if not 0 <= stage <= depth]
        if outside:
            raise ValueError(f"tapped stages {outside} outside 0..{depth} (0: the embedding)")
        self.taps = tuple(taps)
        levels = _levels_for(level, len(description.blocks))
        partitioned = description.partitioned_blocks
        prefix = description.embedding.num_prefix_tokens
        if partitioned and prefix:
            raise ValueError(
                f"blocks {partitioned} use windows or an attention bias over the patch grid, "
                f"which needs an embedding without prefix tokens; this one has {prefix}"
            )
        self.smallest_window = min(
            (block.attention.window.size for block in description.blocks if block.attention.window),
            default=None,
        )
        self.embedding = copy.deepcopy(description.embedding)
        self.blocks = nn.ModuleList(
            EventfulBlock(block, name, cache_dtype, precision)
            for block, name in zip(description.blocks, levels, strict=True)
        )
        self.norm = copy.deepcopy(description.norm)
        self.policy = policy
        self.reduction: TokenReduction | None = None

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(
                f"policy must be an eventful policy (TopK, TopFraction, Threshold, OpsBudget, "
                f"LatencyBudget), got {policy!r}"
            )
        self._policy = policy

    @property
    def encoder(self) -> EventfulViT:
        return self

    @property
    def gate_reference(self) -> str:
        return "previous" if self.blocks[0].previous_frame_gates else "processed"

    @gate_reference.setter
    def gate_reference(self, reference: str) -> None:
        if reference not in ("processed", "previous"):
            raise ValueError(
                f'gate_reference must be "processed" or "previous" (STGT), got {reference!r}'
            )
        for block in self.blocks:
            block.previous_frame_gates = reference == "previous"

    @property
    def kv_pooling(self) -> int:
        return self.blocks[0].kv_pool

    @kv_pooling.setter
    def kv_pooling(self, factor: int) -> None:
        check_factor(factor)
        if factor > 1:
            levels = sorted({block.level for block in self.blocks} - {"tokenwise"})
            if levels:
                raise ValueError(
                    f"K/V pooling runs with the tokenwise level only, which recomputes "
                    f"attention each step; this model has {', '.join(levels)} blocks"
                )
            if any(block.partitioned for block in self.blocks):
                raise ValueError("K/V pooling applies to global attention; this model has windows")
        for block in self.blocks:
            block.kv_pool = factor

    @torch.no_grad()
    @locked_step
    def forward(
        self,
        frames: Tensor,
        state: StreamState,
        trace: StepTrace | None = None,
        check_finite: bool = True,
        refresh: Sequence[int] = (),
        escalation: Escalation | None = None,
    ) -> Tensor:
        low = autocast_dtype(frames)
        if low is None:
            return self._step(frames, state, trace, check_finite, refresh, escalation)
        with torch.autocast(frames.device.type, enabled=False), compute_dtype(low):
            return self._step(frames, state, trace, check_finite, refresh, escalation)

    def _step(
        self,
        frames: Tensor,
        state: StreamState,
        trace: StepTrace | None,
        check_finite: bool,
        refresh: Sequence[int],
        escalation: Escalation | None,
    ) -> Tensor:
        """One time step of every stream in `state`; `trace`, if given, records selections.

        `refresh`: streams to reset once the input has passed its checks, so that this step
        runs them densely (drift control). `escalation` lets every gate select beyond the
        policy where it would leave too much change unprocessed (`eventful.core.escalation`).
        Input errors are raised before any cache is touched.
        Should the step itself fail midway, every stream is reset (its next step runs densely),
        so no half-updated cache is ever used.
        """
        num_tokens = self.check_input(frames, state, check_finite, escalation)
        input_size = (frames.shape[-2], frames.shape[-1])
        state.ensure_writable()
        state.reset(refresh)
        fresh = state.fresh_streams()
        if not state.allocated or state.input_size != input_size:
            grid = self.embedding.grid_size(*input_size)
            specs = [
                block.state_specs(state.batch_size, num_tokens, frames.dtype, grid)
                for block in self.blocks
            ]
            state.allocate(specs, input_size, frames.device)
        grid = self.embedding.grid_size(*input_size)
        if trace is not None:
            trace.num_tokens = num_tokens
            trace.fresh_streams = fresh
            trace.grid = grid
            trace.reduction_macs = [0] * state.batch_size if self.reduction is not None else []
        tapped = []
        try:
            tokens = self.embedding(frames)
            if 0 in self.taps:
                tapped.append(tokens)
            in_one_call = None
            if not fresh and self.reduction is None:
                in_one_call = steps_in_one_call(
                    self.blocks, state, self.policy, tokens, escalation, trace, self.taps
                )
            if in_one_call is not None:
                tokens, tapped_by_blocks = in_one_call
                tapped += tapped_by_blocks
            blocks = zip(self.blocks, state.blocks, strict=True) if in_one_call is None else []
            allowed = None
            for stage, (block, block_state) in enumerate(blocks, start=1):
                if self.reduction is not None and stage - 1 in self.reduction.starts:
                    allowed = self._reduce(stage - 1, tokens, allowed, fresh, trace)
                policy = self.policy.for_block(block_state, fresh)
                if allowed is not None and not bool(allowed.all()):
                    policy = Restricted(policy, allowed)
                tokens = block(tokens, block_state, policy, fresh, trace, escalation, grid)
                if stage in self.taps:
                    tapped.append(tokens)
        except Exception:
            # A failure inside the step (out of memory, say) may leave caches half-updated.
            state.reset()
            raise
        state.mark_processed()
        if self.taps:
            return self.norm(tokens), tuple(tapped)
        return self.norm(tokens)

    def _reduce(self, start, tokens, allowed, fresh, trace) -> Tensor:
        """The tokens (B, T) the blocks from `start` on may re-process: those the reduction
        keeps there and kept before; every token of a fresh stream."""
        group = self.reduction.starts.index(start)
        keep = self.reduction.keep(group, tokens)
        allowed = keep if allowed is None else allowed & keep
        allowed[:, : self.embedding.num_prefix_tokens] = True
        allowed[fresh] = True
        if trace is not None:
            macs = self.reduction.macs(group, tokens.shape[1])
            trace.reduction_macs = [spent + macs for spent in trace.reduction_macs]
        return allowed

    def check_input(
        self,
        frames: Tensor,
        state: StreamState,
        check_finite: bool,
        escalation: Escalation | None = None,
    ) -> int:
        """Validate frames (and an escalation's cap) against the model and state; returns the
        token count per stream."""
        check_frame_tensor(frames, next(self.embedding.parameters()))
        channels = self.embedding.in_chans
        patch = self.embedding.patch_size
        if frames.dim() != 4 or frames.shape[1] != channels:
            raise ValueError(
                f"expected frames of shape (B, {channels}, H, W), got {tuple(frames.shape)}"
            )
        height, width = frames.shape[-2:]
        if height < patch or width < patch:
            raise ValueError(
                f"expected frames of at least {patch}x{patch} pixels (one patch), "
                f"got {height}x{width}"
            )
        if frames.shape[0] != state.batch_size:
            raise ValueError(
                f"frames hold a batch of {frames.shape[0]}, but the stream state holds "
                f"{state.batch_size} streams"
            )
        if state.allocated:
            if state.device != frames.device:
                raise ValueError(
                    f"the stream state is on {state.device}, but frames are on {frames.device}; "
                    "move it with state.to(device)"
                )
            if state.dtype != frames.dtype:
                raise ValueError(
                    f"the stream state has dtype {state.dtype}, frames have dtype {frames.dtype}"
                )
            size = (height, width)
            if state.input_size != size and not all(state.fresh):
                raise ValueError(
                    f"frames of {height}x{width} pixels differ from the "
                    f"{state.input_size[0]}x{state.input_size[1]} this stream state was built "
                    "for; reset every stream (stream.reset()) to change the input size"
                )
        rows, cols = self.embedding.grid_size(height, width)
        if self.smallest_window is not None and min(rows, cols) < self.smallest_window:
            size = self.smallest_window
            raise ValueError(
                f"frames of {height}x{width} pixels give a {rows}x{cols} patch grid, smaller "
                f"than one {size}x{size} attention window; expected at least "
                f"{size * patch}x{size * patch} pixels"
            )
        num_tokens = self.embedding.num_tokens(height, width)
        if self.kv_pooling > 1:
            check_pooling(self.kv_pooling, (rows, cols))
        self.policy.validate(num_tokens, self.blocks)
        if escalation is not None:
            escalation.validate(num_tokens, self.policy)
        if check_finite and not bool(torch.isfinite(frames).all()):
            raise ValueError("frames contain NaN or Inf values; expected finite pixel values")
        return num_tokens
