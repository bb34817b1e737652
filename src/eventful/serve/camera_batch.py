"""The cameras one worker serves with one converted model, batched.

Each camera is one eventful stream. Frames are submitted per camera and queued; `step` runs,
for every camera with a frame waiting, its oldest waiting frame, all such cameras of one frame
size in one batched step. The batch keeps its cameras from step to step while the same
cameras have frames due, and is re-formed with `Stream.take` and `Stream.cat` when they change,
so a camera's caches follow it wherever it runs.

Back-pressure: a camera holds at most `max_pending` waiting frames; a new frame beyond that
drops the oldest waiting one (the newest are kept), and the drop is counted and reported with
the camera's next result. A frame of a new size resets its camera (its next step is dense),
and the reset is reported. Nothing one camera submits affects another.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from eventful.core.drift import DEFAULT_DRIFT, DriftControl
from eventful.core.model import EventfulModule
from eventful.core.stream import Stream


@dataclass
class FrameResult:
    """One camera's output for one frame, with its report: multiply-accumulates of the step
    (and of the dense model), the share of tokens updated, the estimated cosine to the dense
    output (None without an estimate), the drift-control events, the frames dropped since the
    last result, and whether the camera was reset before this frame (new size)."""

    camera: Hashable
    sequence: int
    output: object
    ops: int
    dense_ops: int
    updated_fraction: float
    estimated_cosine: float | None
    events: list = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    reset: str | None = None


@dataclass
class _Camera:
    stream: Stream | None  # None while the camera runs inside a batch
    pending: deque = field(default_factory=deque)  # (sequence, frame)
    last_sequence: int = -1
    dropped: list[int] = field(default_factory=list)
    size: tuple[int, ...] | None = None
    reset: str | None = None


class CameraBatch:
    """Cameras served by one converted `model` (as `eventful.convert` returns it), each with
    its own stream state, drift control (`drift`) and result order."""

    def __init__(
        self,
        model: EventfulModule,
        max_pending: int = 2,
        drift: DriftControl | None = DEFAULT_DRIFT,
    ) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive integer, got {max_pending!r}")
        self.model = model
        self.max_pending = max_pending
        self.drift = drift
        self.cameras: dict[Hashable, _Camera] = {}
        # Per frame size: the cameras of the batch formed last, in order, and their stream.
        self.batches: dict[tuple[int, ...], tuple[list[Hashable], Stream]] = {}

    def add(self, camera: Hashable, snapshot: dict | None = None) -> None:
        """Start serving `camera`: from a fresh stream, or from `Stream.state_dict` snapshot
        (a camera moved from another worker; refused if taken of another model)."""
        if camera in self.cameras:
            raise ValueError(f"camera {camera!r} is already served here")
        stream = Stream(self.model, drift=self.drift)
        if snapshot is not None:
            stream.load_state_dict(snapshot)
        self.cameras[camera] = _Camera(stream)

    def remove(self, camera: Hashable) -> dict:
        """Stop serving `camera`; returns its snapshot (`Stream.state_dict`). Frames still
        waiting are discarded."""
        state = self._camera(camera)
        stream = self._park(camera)
        del self.cameras[camera]
        state.pending.clear()
        return stream.state_dict()

    def snapshot(self, camera: Hashable) -> dict:
        """`camera`'s snapshot (`Stream.state_dict`) as of its last step; it keeps running."""
        self._camera(camera)
        for members, stream in self.batches.values():
            if camera in members:
                return stream.take([members.index(camera)]).state_dict()
        return self.cameras[camera].stream.state_dict()

    def submit(self, camera: Hashable, sequence: int, frame: Tensor) -> None:
        """Queue `frame` (C, H, W) of `camera`, numbered `sequence` (increasing per camera)."""
        state = self._camera(camera)
        if not isinstance(frame, Tensor) or frame.dim() != 3:
            shape = tuple(frame.shape) if isinstance(frame, Tensor) else type(frame).__name__
            raise ValueError(f"camera {camera!r}: expected a frame (C, H, W), got {shape}")
        if isinstance(sequence, bool) or not isinstance(sequence, int):
            raise ValueError(f"camera {camera!r}: sequence must be an integer, got {sequence!r}")
        if sequence <= state.last_sequence:
            raise ValueError(
                f"camera {camera!r}: frame {sequence} arrived after frame {state.last_sequence}; "
                "sequence numbers must increase"
            )
        state.last_sequence = sequence
        if len(state.pending) == self.max_pending:
            dropped, _ = state.pending.popleft()  # keep the newest
            state.dropped.append(dropped)
        state.pending.append((sequence, frame))

    def pending(self) -> int:
        """Frames waiting, over every camera."""
        return sum(len(state.pending) for state in self.cameras.values())

    def step(self) -> list[FrameResult]:
        """Run the oldest waiting frame of every camera that has one; results in camera order
        of the batches, one per camera."""
        due: dict[tuple[int, ...], list[Hashable]] = {}
        for camera, state in self.cameras.items():
            if not state.pending:
                continue
            size = tuple(state.pending[0][1].shape)
            if state.size is not None and state.size != size:
                self._park(camera)
                state.stream.reset()
                state.reset = f"frame size changed from {state.size} to {size}"
            state.size = size
            due.setdefault(size, []).append(camera)
        results = []
        for size, cameras in due.items():
            stream = self._form(size, cameras)
            frames = torch.stack([self.cameras[c].pending[0][1] for c in cameras])
            outputs = stream(frames)
            results += self._results(cameras, stream, outputs)
            for camera in cameras:
                self.cameras[camera].pending.popleft()
        return results

    def _camera(self, camera: Hashable) -> _Camera:
        if camera not in self.cameras:
            raise KeyError(f"unknown camera {camera!r}; add it first")
        return self.cameras[camera]

    def _park(self, camera: Hashable) -> Stream:
        """The camera's own stream, taken out of any batch it is in."""
        state = self.cameras[camera]
        for size, (members, stream) in list(self.batches.items()):
            if camera in members:
                state.stream = stream.take([members.index(camera)])
                rest = [index for index, member in enumerate(members) if member != camera]
                if rest:
                    self.batches[size] = ([members[i] for i in rest], stream.take(rest))
                else:
                    del self.batches[size]
        return state.stream

    def _form(self, size: tuple[int, ...], cameras: list[Hashable]) -> Stream:
        """The batched stream of `cameras` (in that order) for frames of `size`."""
        members, stream = self.batches.get(size, ([], None))
        if members == cameras:
            return stream
        for camera in members:
            if camera not in cameras:
                self._park(camera)
        members, stream = self.batches.get(size, ([], None))
        parts = []
        for camera in cameras:
            if camera in members:
                parts.append(stream.take([members.index(camera)]))
            else:
                parts.append(self.cameras[camera].stream)
                self.cameras[camera].stream = None
        joined = Stream.cat(parts)
        self.batches[size] = (list(cameras), joined)
        return joined

    def _results(self, cameras, stream: Stream, outputs) -> list[FrameResult]:
        fractions = stream.updated_fraction() if stream.trace is not None else None
        results = []
        for index, camera in enumerate(cameras):
            state = self.cameras[camera]
            ops = stream.ops
            results.append(
                FrameResult(
                    camera=camera,
                    sequence=state.pending[0][0],
                    output=_row(outputs, index),
                    ops=0 if ops is None else sum(ops.per_stream[index].values()),
                    dense_ops=0 if ops is None else ops.dense_per_stream[index],
                    updated_fraction=1.0 if fractions is None else fractions[index],
                    estimated_cosine=(
                        None if stream.estimated_cosine is None else stream.estimated_cosine[index]
                    ),
                    events=[
                        dataclasses.replace(event, stream=0)
                        for event in stream.events
                        if event.stream == index
                    ],
                    dropped=state.dropped,
                    reset=state.reset,
                )
            )
            state.dropped, state.reset = [], None
        return results


def _row(outputs: object, index: int) -> object:
    """Stream `index`'s part of a batched output: a tensor, or tuples (named ones keep their
    type) and mappings of them (transformers' output objects are mappings)."""
    if isinstance(outputs, Tensor):
        return outputs[index : index + 1]
    if isinstance(outputs, tuple):
        parts = [_row(part, index) for part in outputs]
        return type(outputs)(*parts) if hasattr(outputs, "_fields") else tuple(parts)
    if isinstance(outputs, Mapping):
        return type(outputs)(**{name: _row(part, index) for name, part in outputs.items()})
    raise TypeError(f"cannot split a batched output of type {type(outputs).__name__}")
