"""A stateful wrapper for the common loop: one call per time step of a batch of streams."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from eventful.core.drift import DEFAULT_DRIFT, DriftControl, DriftEvent, DriftMonitor
from eventful.core.estimate import FidelityEstimate
from eventful.core.fidelity_policy import Fidelity
from eventful.core.fingerprint import cached_fingerprint
from eventful.core.model import EventfulModule, check_frame_tensor, step_lock
from eventful.core.ops import OpCount, StepTrace, count_step
from eventful.core.policies import StepReport
from eventful.core.state import StreamState
from eventful.profile import part

# The format of `Stream.state_dict` snapshots; a snapshot of another format is refused.
SNAPSHOT_FORMAT = "eventful-stream/1"


def _ordinary(value: Any) -> Any:
    """An inference tensor copied into an ordinary one; anything else as it is."""
    if isinstance(value, Tensor) and value.is_inference():
        return value.clone()
    return value


def _levels_text(levels: list[str] | None) -> str:
    if levels and len(set(levels)) == 1:
        return f"{levels[0]!r} in every block"
    return repr(levels)


class Stream:
    """Runs `model` step by step over its own `StreamState`.

    After each call, `ops` holds the step's op counts (when `count_ops`), `trace` the tokens
    every gate selected per stream, `seconds` the step's wall time by `clock` (default
    `time.perf_counter`; inject another to drive a LatencyBudget in tests) and `events` the
    drift-control refreshes of the step (`event_log`: all of them so far); `steps` counts the
    steps run. After each step the policy in force receives a `StepReport` (`Policy.observe`).
    `drift` (a `DriftControl`; `DEFAULT_DRIFT` unless given, None for none) refreshes streams
    whose caches may have drifted and lets gates escalate. With `estimate` (a
    `FidelityEstimate` calibrated for this model), `estimated_cosine` holds after each step, per
    stream, the estimated cosine similarity of its output to the dense model's; a `Fidelity`
    policy of the model that has no estimate of its own is given this one.
    `check_finite=False` skips the NaN/Inf check of the frames, which on CUDA waits for the
    device once per step. `compile=True` runs the step through `torch.compile` (static shapes;
    the first calls compile, for some seconds).
    """

    def __init__(
        self,
        model: EventfulModule,
        batch_size: int = 1,
        count_ops: bool = True,
        check_finite: bool = True,
        compile: bool = False,
        drift: DriftControl | None = DEFAULT_DRIFT,
        clock: Callable[[], float] = time.perf_counter,
        estimate: FidelityEstimate | None = None,
    ) -> None:
        if drift is not None and not isinstance(drift, DriftControl):
            raise TypeError(f"drift must be a DriftControl or None, got {drift!r}")
        if estimate is not None:
            if not isinstance(estimate, FidelityEstimate):
                raise TypeError(f"estimate must be a FidelityEstimate or None, got {estimate!r}")
            estimate.check(model.encoder, model.levels)
            policy = model.encoder.policy
            if isinstance(policy, Fidelity) and policy.estimate is None:
                model.encoder.policy = policy.bound_to(estimate)
        self.model = model
        self._step = torch.compile(model, dynamic=False) if compile else model
        self.state = StreamState(batch_size)
        self.count_ops = count_ops
        self.check_finite = check_finite
        self.clock = clock
        self.drift = None if drift is None else drift.monitor(batch_size)
        self.estimate = estimate
        self.estimated_cosine: list[float] | None = None
        self.ops: OpCount | None = None
        self.trace: StepTrace | None = None
        self.seconds: float | None = None
        self.steps = 0
        self.events: list[DriftEvent] = []
        self.event_log: list[DriftEvent] = []

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @torch.no_grad()
    def __call__(self, frames: Tensor) -> Any:
        """One time step: frames (B, C, H, W) -> what the converted model returns. Safe to call
        from several threads (`step_lock`).

        A step never records gradients, so it runs under `torch.inference_mode`, which spares
        every operator autograd's bookkeeping; called outside inference mode, the step returns
        its outputs as ordinary tensors (copies), which may be changed in place and used with
        autograd like any other. Forward hooks inside the step see inference tensors."""
        with step_lock(self.model):
            if torch.is_inference_mode_enabled():
                return self._call(frames)
            with torch.inference_mode():
                output = self._call(frames)
            return tree_map(_ordinary, output)

    def _call(self, frames: Tensor) -> Any:
        policy = self.model.encoder.policy
        fresh = list(self.state.fresh)
        plan = None
        if self.drift is not None:
            check_frame_tensor(frames, next(self.model.encoder.parameters()))
            with part("drift"):
                plan = self.drift.plan(frames, self.steps, fresh)
        refresh = [] if plan is None else plan.streams
        control = None if self.drift is None else self.drift.control
        needs_trace = (
            self.count_ops
            or self.estimate is not None
            or (control is not None and control.error_bound is not None)
        )
        trace = StepTrace(num_tokens=0, fresh_streams=[]) if needs_trace else None
        start = self.clock()
        with part("model"):
            output = self._step(
                frames,
                self.state,
                trace=trace,
                check_finite=self.check_finite,
                refresh=refresh,
                escalation=None if control is None else control.escalation,
            )
            if policy.needs_wall_time and frames.is_cuda:
                torch.cuda.synchronize(frames.device)
        self.seconds = self.clock() - start
        dense = sorted({stream for stream, was in enumerate(fresh) if was} | set(refresh))
        self.trace = trace
        self.ops = None
        if trace is not None and self.count_ops:
            with part("count"):
                self.ops = count_step(self.model.encoder.blocks, trace)
        if plan is not None:
            with part("drift"):
                unprocessed = None if trace is None else trace.unprocessed_share
                self.drift.commit(plan, frames, self.steps, dense, unprocessed)
        if self.estimate is not None:
            with part("estimate"):
                self.estimated_cosine = self.estimate.estimate(trace)
        self.events = plan.events if plan is not None else []
        self.event_log.extend(self.events)
        self.steps += 1
        policy.observe(StepReport(self.seconds, self.batch_size, dense, self.ops))
        return output

    def updated_fraction(self, gates: tuple[str, ...] = ("qkv", "proj", "mlp")) -> list[float]:
        """Per stream, the fraction of tokens the token-wise layers processed in the last step,
        averaged over blocks and the given gates."""
        trace = self._last_trace()
        fractions = [0.0] * self.batch_size
        share = 1 / (len(trace.blocks) * len(gates))
        for selections in trace.blocks:
            for gate in gates:
                selection = selections[gate]
                for stream, count in enumerate(selection.counts):
                    fractions[stream] += share * count / selection.num_tokens
        return fractions

    def updated_tokens(self, stream: int = 0, gate: str = "qkv") -> torch.Tensor:
        """For each token (T,), the fraction of blocks whose `gate` processed it last step."""
        trace = self._last_trace()
        counts = torch.zeros(trace.num_tokens)
        for selections in trace.blocks:
            counts[selections[gate].per_stream[stream].cpu()] += 1
        return counts / len(trace.blocks)

    def _last_trace(self) -> StepTrace:
        if self.trace is None:
            raise RuntimeError("no step traced yet: call the stream with count_ops=True first")
        return self.trace

    def reset(self, streams: Iterable[int] | None = None) -> None:
        """Forget the caches of all streams, or of the given ones: their next step is dense."""
        self.state.reset(streams)

    def to(self, device: torch.device | str) -> Stream:
        """Move the model and the state to `device`."""
        self.model.to(device)
        self.state.to(device)
        return self

    def state_dict(self) -> dict:
        """A snapshot (copied tensors) of the caches (`StreamState.state_dict`), the step count
        and the drift control's running state (None without drift control), with the snapshot
        format, the model's fingerprint and its configuration (levels, precision, policy type);
        `torch.save` and `load_state_dict` accept it. The policy's own state (a budget's
        history) is not in it."""
        snapshot = self.state.state_dict()
        snapshot["format"] = SNAPSHOT_FORMAT
        snapshot["fingerprint"] = cached_fingerprint(self.model)
        snapshot["configuration"] = self._configuration()
        snapshot["steps"] = self.steps
        snapshot["drift"] = None if self.drift is None else self.drift.state_dict()
        return snapshot

    def load_state_dict(self, snapshot: dict) -> None:
        """Continue exactly where the snapshot's stream was. A snapshot without drift history
        (taken without drift control) starts this stream's triggers afresh from its step.
        Refuses, changing nothing, a snapshot of another format, of a model converted otherwise
        (levels, precision, policy type: their caches differ) or of other weights; snapshots
        from before these were recorded carry none of them and are accepted."""
        found = snapshot.get("format", SNAPSHOT_FORMAT)
        if found != SNAPSHOT_FORMAT:
            raise ValueError(
                f"the snapshot has format {found!r}; this version reads {SNAPSHOT_FORMAT!r}"
            )
        if "configuration" in snapshot:
            self._check_configuration(snapshot["configuration"])
        if "fingerprint" in snapshot and snapshot["fingerprint"] != cached_fingerprint(self.model):
            raise ValueError(
                f"the snapshot is of a model with fingerprint {snapshot['fingerprint']}; this "
                f"stream's model has {cached_fingerprint(self.model)}"
            )
        steps = snapshot.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"snapshot steps must be a non-negative integer, got {steps!r}")
        monitor = None
        if self.drift is not None:
            monitor = self.drift.control.monitor(self.batch_size)
            if snapshot.get("drift") is None:
                monitor.last_dense = [steps] * self.batch_size
            else:
                monitor.load_state_dict(snapshot["drift"])
        self.state.load_state_dict(snapshot)
        self.steps = steps
        self.drift = monitor

    def _configuration(self) -> dict:
        """What a snapshot's caches depend on besides the weights."""
        encoder = self.model.encoder
        return {
            "levels": list(self.model.levels),
            "dtype": str(next(encoder.parameters()).dtype),
            "cache_dtype": str(encoder.blocks[0].cache_dtype),
            "precision": self.model.precision,
            "policy": type(encoder.policy).__name__,
        }

    def _check_configuration(self, taken: dict) -> None:
        here = self._configuration()
        if taken.get("levels") != here["levels"]:
            raise ValueError(
                f"the snapshot was taken with levels {_levels_text(taken.get('levels'))}; this "
                f"stream's model runs {_levels_text(here['levels'])}: convert it with the "
                "snapshot's levels"
            )
        for key, what in (("dtype", "weights"), ("cache_dtype", "attention caches")):
            if taken.get(key) != here[key]:
                raise ValueError(
                    f"the snapshot was taken with {what} in {taken.get(key)}; this stream's "
                    f"model has {here[key]}: convert it at the snapshot's precision"
                )
        taken_precision = taken.get("precision", "fp32")  # snapshots from before precisions
        if taken_precision != here["precision"]:
            raise ValueError(
                f"the snapshot was taken with linear layers at precision {taken_precision!r}; "
                f"this stream's model runs {here['precision']!r}: convert it with "
                f"precision={taken_precision!r}"
            )
        if taken.get("policy") != here["policy"]:
            raise ValueError(
                f"the snapshot was taken under a {taken.get('policy')} policy, this stream's "
                f"model has a {here['policy']} one (a policy may keep caches of its own, as "
                f"MaxAge does): restore it under a {taken.get('policy')}, then assign the new one"
            )

    def take(self, streams: Iterable[int]) -> Stream:
        """A new stream of the same model with copies of the caches, step count and drift
        history of `streams`, in that order: cameras leaving this batch. This stream is left
        as it was; the new one starts with no events logged."""
        chosen = list(streams)
        taken = self._like(len(chosen))
        taken.state = self.state.take(chosen)
        if self.drift is not None:
            taken.drift = self.drift.take(chosen)
        taken.steps = self.steps
        return taken

    @staticmethod
    def cat(streams: list[Stream]) -> Stream:
        """One stream holding the streams of `streams` (of one model), in order: cameras
        joining a batch. The joined stream counts steps from the largest count; each camera's
        drift history keeps its own age."""
        if not streams:
            raise ValueError("cat needs at least one stream")
        first = streams[0]
        if any(stream.model is not first.model for stream in streams):
            raise ValueError("only streams of one converted model can share a batch")
        if len({stream.drift is None for stream in streams}) > 1:
            raise ValueError("streams with and without drift control cannot share a batch")
        joined = first._like(sum(stream.batch_size for stream in streams))
        joined.state = StreamState.cat([stream.state for stream in streams])
        joined.steps = max(stream.steps for stream in streams)
        if first.drift is not None:
            shifts = [joined.steps - stream.steps for stream in streams]
            joined.drift = DriftMonitor.cat([stream.drift for stream in streams], shifts)
        return joined

    def _like(self, batch_size: int) -> Stream:
        """A new stream of this one's model and settings for `batch_size` streams."""
        return Stream(
            self.model,
            batch_size,
            count_ops=self.count_ops,
            check_finite=self.check_finite,
            compile=self._step is not self.model,
            drift=None if self.drift is None else self.drift.control,
            clock=self.clock,
            estimate=self.estimate,
        )
