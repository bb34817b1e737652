"""Drift control: dense refresh steps that bound how far an eventful stream strays from dense.

An eventful stream re-processes only some tokens per step, so its caches drift from what the
dense model would hold. A *refresh* runs one stream's step densely (`StreamState.reset` of that
stream just before its step), which puts its caches back on the dense model's values. The
other streams of the batch keep their caches and run as they would have, up to float rounding
(README, "What is exact").

Frames are counted per `Stream`: frame 0 is its first step, which is dense anyway.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

# Scene cuts compare a frame's change with the typical change of up to CUT_HISTORY earlier
# frames, once at least CUT_MIN_HISTORY are known: the larger of their median and their mean
# (a camera that moves every few frames raises the mean, not the median), and at least
# CUT_CONTRAST_FLOOR times the previous frame's contrast (its mean absolute deviation), so that
# in a still scene a small motion is not a cut: a cut replaces the content, and changes the
# frame by a large part of its whole contrast.
# Images (B, C, H, W) are compared on a CUT_GRID x CUT_GRID grid of cell means. Motion mostly
# moves detail within a cell, a cut replaces the cells: on bikes.mp4 the cut that follows a
# fast pan stands out on the grid and not at full resolution (BENCHMARKS.md, "scene-cuts").
CUT_HISTORY = 16
CUT_MIN_HISTORY = 3
CUT_CONTRAST_FLOOR = 0.05
CUT_GRID = 16

# Trigger kinds, in the order of precedence when several fire for one stream at one frame;
# "resolution" is recorded by the video runner, which resets the stream on a new frame size.
KINDS = ("scene_cut", "error", "periodic", "resolution")


@dataclass(frozen=True)
class DriftEvent:
    """One stream ran a frame densely because of a trigger.

    frame: the step index of the dense step (0 = the stream's first step); kind: one of
    `KINDS`; value: what crossed its bound (error: the unprocessed change; scene_cut: the
    frame's change over the typical change), None for the others.
    """

    frame: int
    stream: int
    kind: str
    value: float | None = None


def _optional_number(name: str, value: object, integer: bool = False) -> None:
    if value is None:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        expected = "a positive integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {expected} or None, got {value!r}")


class DriftControl:
    """Which triggers refresh a stream; pass it to `model.stream(drift=...)`. Each is optional.

    refresh_every: N > 0. A stream runs densely once N frames have passed since its last dense
        step (with no other refresh: frames N, 2N, ...).
    error_bound: B >= 0. After each step, the change the first block's qkv gate left
        unprocessed (per stream, the sum over tokens of the L2 norm of each unselected token's
        change since it was last processed; `StepTrace.unprocessed_change`) is compared with B;
        a stream above it runs its next step densely.
    scene_cut_factor: F > 1. A stream runs densely at a frame whose change, the mean absolute
        difference of its input to the previous frame's (images compared as `CUT_GRID` x
        `CUT_GRID` cell means), exceeds F times the typical change of its recent frames
        (`CUT_HISTORY`, at least `CUT_MIN_HISTORY` of them: the larger of their median and
        mean, and at least `CUT_CONTRAST_FLOOR` times the frame's contrast). Costs one
        device-to-host read per step on CUDA.

    A stream already due to run densely (its first step, or reset by the caller) triggers
    nothing; when several triggers fire for one stream at one frame, one event is recorded,
    the first of `KINDS`. Settings only: one DriftControl may serve several streams.
    """

    def __init__(
        self,
        refresh_every: int | None = None,
        error_bound: float | None = None,
        scene_cut_factor: float | None = None,
    ) -> None:
        _optional_number("refresh_every", refresh_every, integer=True)
        if refresh_every is not None and refresh_every < 1:
            raise ValueError(
                f"refresh_every must be a positive integer or None, got {refresh_every!r}"
            )
        _optional_number("error_bound", error_bound)
        if error_bound is not None and error_bound < 0:
            raise ValueError(f"error_bound must be >= 0 or None, got {error_bound!r}")
        _optional_number("scene_cut_factor", scene_cut_factor)
        if scene_cut_factor is not None and scene_cut_factor <= 1:
            raise ValueError(f"scene_cut_factor must be > 1 or None, got {scene_cut_factor!r}")
        self.refresh_every = refresh_every
        self.error_bound = None if error_bound is None else float(error_bound)
        self.scene_cut_factor = None if scene_cut_factor is None else float(scene_cut_factor)

    def monitor(self, batch_size: int) -> DriftMonitor:
        """The per-stream running state of these triggers for a batch of streams."""
        return DriftMonitor(self, batch_size)

    def __repr__(self) -> str:
        return (
            f"DriftControl(refresh_every={self.refresh_every}, error_bound={self.error_bound}, "
            f"scene_cut_factor={self.scene_cut_factor})"
        )


@dataclass(frozen=True)
class DriftPlan:
    """What the triggers decided before a step: the events, and the frame changes measured."""

    events: list[DriftEvent]
    changes: list[float] | None

    @property
    def streams(self) -> list[int]:
        return [event.stream for event in self.events]


class DriftMonitor:
    """The running side of a `DriftControl` for one batch of streams; a `Stream` owns one.

    `plan` decides before a step and changes nothing, so a step that fails leaves the monitor as
    it was; `commit` records a step that completed.
    """

    def __init__(self, control: DriftControl, batch_size: int) -> None:
        self.control = control
        self.last_dense = [0] * batch_size
        self.over_bound: list[float | None] = [None] * batch_size
        self.changes = [deque(maxlen=CUT_HISTORY) for _ in range(batch_size)]
        self.previous: Tensor | None = None  # the last frames, coarse (`_coarse`)
        self.previous_shape: tuple[int, ...] | None = None
        self.previous_contrast: list[float] = [0.0] * batch_size

    def state_dict(self) -> dict:
        """A snapshot (copied) of the triggers' running state, for `load_state_dict`."""
        return {
            "last_dense": list(self.last_dense),
            "over_bound": list(self.over_bound),
            "changes": [list(history) for history in self.changes],
            "previous": None if self.previous is None else self.previous.clone(),
            "previous_shape": self.previous_shape,
            "previous_contrast": list(self.previous_contrast),
        }

    def load_state_dict(self, snapshot: dict) -> None:
        """Restore a snapshot from `state_dict` of a monitor with as many streams."""
        if len(snapshot["last_dense"]) != len(self.last_dense):
            raise ValueError(
                f"drift snapshot holds {len(snapshot['last_dense'])} streams, "
                f"expected {len(self.last_dense)}"
            )
        self.last_dense = list(snapshot["last_dense"])
        self.over_bound = list(snapshot["over_bound"])
        self.changes = [deque(history, maxlen=CUT_HISTORY) for history in snapshot["changes"]]
        previous = snapshot["previous"]
        self.previous = None if previous is None else previous.clone()
        shape = snapshot["previous_shape"]
        self.previous_shape = None if shape is None else tuple(shape)
        self.previous_contrast = list(snapshot["previous_contrast"])

    def plan(self, frames: object, frame: int, fresh: list[bool]) -> DriftPlan:
        """The refreshes due at step `frame` of streams whose `fresh` flag is False."""
        changes = self._frame_changes(frames)
        events = []
        for stream, already_fresh in enumerate(fresh):
            if already_fresh:
                continue
            fired = self._fired(stream, frame, changes)
            if fired:
                events.append(fired)
        return DriftPlan(events, changes)

    def commit(
        self,
        plan: DriftPlan,
        frames: Tensor,
        frame: int,
        dense_streams: list[int],
        unprocessed_change: Tensor | None,
    ) -> None:
        """Record the completed step `frame`, in which `dense_streams` ran densely."""
        for stream in dense_streams:
            self.last_dense[stream] = frame
        if self.control.error_bound is not None and unprocessed_change is not None:
            bound = self.control.error_bound
            self.over_bound = [
                change if change > bound else None for change in unprocessed_change.tolist()
            ]
        if self.control.scene_cut_factor is not None:
            if plan.changes is None:
                for history in self.changes:
                    history.clear()
            else:
                for history, change in zip(self.changes, plan.changes, strict=True):
                    history.append(change)
            self.previous = _coarse(frames.detach()).clone()
            self.previous_shape = tuple(frames.shape)
            flat = self.previous.flatten(1).float()
            deviation = (flat - flat.mean(1, keepdim=True)).abs().mean(1)
            self.previous_contrast = deviation.tolist()

    def cut_ratio(self, stream: int, change: float) -> float | None:
        """A frame change of `stream` over its typical change; None while its history is
        shorter than CUT_MIN_HISTORY. A scene cut is a ratio above `scene_cut_factor`."""
        history = self.changes[stream]
        if len(history) < CUT_MIN_HISTORY:
            return None
        typical = max(
            statistics.median(history),
            statistics.fmean(history),
            CUT_CONTRAST_FLOOR * self.previous_contrast[stream],
        )
        if typical == 0:  # a frozen, featureless input: anything that appears is a cut
            return math.inf if change > 0 else 0.0
        return change / typical

    def _fired(self, stream: int, frame: int, changes: list[float] | None) -> DriftEvent | None:
        control = self.control
        if changes is not None:
            ratio = self.cut_ratio(stream, changes[stream])
            if ratio is not None and ratio > control.scene_cut_factor:
                return DriftEvent(frame, stream, "scene_cut", ratio)
        if self.over_bound[stream] is not None:
            return DriftEvent(frame, stream, "error", self.over_bound[stream])
        every = control.refresh_every
        if every is not None and frame - self.last_dense[stream] >= every:
            return DriftEvent(frame, stream, "periodic")
        return None

    def _frame_changes(self, frames: object) -> list[float] | None:
        """Per stream, the mean absolute change of `frames` (B, ...) to the previous frames,
        both coarse (`_coarse`); None without scene-cut detection, a previous frame or a
        matching shape."""
        previous = self.previous
        if self.control.scene_cut_factor is None or previous is None:
            return None
        if not isinstance(frames, Tensor) or tuple(frames.shape) != self.previous_shape:
            return None
        coarse = _coarse(frames)
        if coarse.dtype != previous.dtype or coarse.device != previous.device:
            return None
        return (coarse - previous).abs().flatten(1).float().mean(1).tolist()


def _coarse(frames: Tensor) -> Tensor:
    """Images (B, C, H, W) as CUT_GRID x CUT_GRID cell means; other inputs as they are."""
    if frames.ndim == 4 and min(frames.shape[-2:]) > CUT_GRID:
        return F.adaptive_avg_pool2d(frames, CUT_GRID)
    return frames
