"""A stateful wrapper for the common loop: one call per time step of a batch of streams."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from eventful.core.model import EventfulModule
from eventful.core.ops import OpCount, StepTrace, count_step
from eventful.core.state import StreamState


class Stream:
    """Runs `model` step by step over its own `StreamState`.

    After each call, `ops` holds the step's op counts (when `count_ops`) and `trace` the
    tokens every gate selected per stream. `check_finite=False` skips the NaN/Inf check of
    the frames, which on CUDA waits for the device once per step. `compile=True` runs the
    step through `torch.compile` (static shapes; the first calls compile, for some seconds).
    """

    def __init__(
        self,
        model: EventfulModule,
        batch_size: int = 1,
        count_ops: bool = True,
        check_finite: bool = True,
        compile: bool = False,
    ) -> None:
        self.model = model
        self._step = torch.compile(model, dynamic=False) if compile else model
        self.state = StreamState(batch_size)
        self.count_ops = count_ops
        self.check_finite = check_finite
        self.ops: OpCount | None = None
        self.trace: StepTrace | None = None

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @torch.no_grad()
    def __call__(self, frames: Tensor) -> Any:
        """One time step: frames (B, C, H, W) -> what the converted model returns."""
        trace = StepTrace(num_tokens=0, fresh_streams=[]) if self.count_ops else None
        output = self._step(frames, self.state, trace=trace, check_finite=self.check_finite)
        self.trace = trace
        self.ops = None if trace is None else count_step(self.model.encoder.blocks, trace)
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
        return self.state.state_dict()

    def load_state_dict(self, snapshot: dict) -> None:
        self.state.load_state_dict(snapshot)
