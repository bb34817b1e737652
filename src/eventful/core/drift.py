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

import torch
import torch.nn.functional as F
from torch import Tensor

from eventful.core.checks import check_count, check_number
from eventful.core.escalation import Escalation

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

# A content change needs no history: the frame's change is a large share of the contrast of the
# frame or of the previous one, whichever is larger (a cut, a flash, a scene that appears from
# black), or the frame holds CONTENT_DETAIL_GROWTH times the detail of the previous one (a scene
# that appears from a faint or featureless frame; detail, unlike contrast, ignores letterbox
# bars), or the frame's contrast is CONTENT_CONTRAST_CHANGE times larger or smaller than at the
# stream's last dense step (a fade or an exposure change: every token changes a little, and a
# quarter of them cannot follow; ordinary motion keeps a scene's contrast). Changes below
# CONTENT_MIN_CHANGE (in the input's units, for normalised images about one grey level of a cell
# mean; for contrasts, their difference) never count, so that noise on a dark or covered camera
# is not content.
CONTENT_MIN_CHANGE = 0.02
CONTENT_DETAIL_GROWTH = 4.0
CONTENT_CONTRAST_CHANGE = 1.25

# Trigger kinds, in the order of precedence when several fire for one stream at one frame;
# "resolution" is recorded by the video runner, which resets the stream on a new frame size.
KINDS = ("scene_cut", "content_change", "error", "periodic", "resolution")


@dataclass(frozen=True)
class DriftEvent:
    """One stream ran a frame densely because of a trigger.

    frame: the step index of the dense step (0 = the stream's first step); kind: one of
    `KINDS`; value: what crossed its bound (error: the unprocessed share; scene_cut: the
    frame's change over the typical change; content_change: the frame's change over its
    contrast), None for the others.
    """

    frame: int
    stream: int
    kind: str
    value: float | None = None


@dataclass(frozen=True)
class DriftControl:
    """Which triggers refresh a stream, and how far a gate may escalate; pass it to
    `model.stream(drift=...)`. Every setting is optional (None: off). `DEFAULT_DRIFT` is what
    `model.stream()` uses unless told otherwise; `drift=None` turns everything off.

    refresh_every: N > 0. A stream runs densely once N frames have passed since its last dense
        step (with no other refresh: frames N, 2N, ...).
    error_bound: B >= 0. After each step, its unprocessed share (`StepTrace.unprocessed_share`:
        the change every gate left unprocessed, as a share of the gate input's size, averaged
        over the gates; `eventful.core.gates`) is compared with B; a stream above it runs its
        next step densely. The fidelity estimate reads the same share (`eventful.core.estimate`).
    scene_cut_factor: F > 1. A stream runs densely at a frame whose change, the mean absolute
        difference of its input to the previous frame's (images compared as `CUT_GRID` x
        `CUT_GRID` cell means), exceeds F times the typical change of its recent frames
        (`CUT_HISTORY`, at least `CUT_MIN_HISTORY` of them: the larger of their median and
        mean, and at least `CUT_CONTRAST_FLOOR` times the frame's contrast).
    content_change: C > 0. A stream runs densely at a frame whose change (as above) exceeds
        `CONTENT_MIN_CHANGE` and either exceeds C times the contrast (mean absolute deviation of
        the cell means) of the frame or of the previous frame, whichever is larger, or comes
        with `CONTENT_DETAIL_GROWTH` times the previous frame's detail (upper quartile of the
        differences of neighbouring cell means); or the frame's contrast differs by a factor
        above `CONTENT_CONTRAST_CHANGE` from its contrast at the stream's last dense step. It
        needs no history: it catches a cut in the first frames of a stream, a scene that appears
        from black, a single colour or a faint frame, and a fade in or out.
    escalation_bound: E >= 0, with escalation_max_tokens (None: every token). At every gate, a
        stream whose unprocessed share after the policy's selection exceeds E selects more of
        its tokens of largest change, up to escalation_max_tokens (`eventful.core.escalation`).

    The scene-cut and content tests cost one device-to-host read per step on CUDA. A stream
    already due to run densely (its first step, or reset by the caller) triggers nothing; when
    several triggers fire for one stream at one frame, one event is recorded, the first of
    `KINDS`. Settings only: one DriftControl may serve several streams.
    """

    refresh_every: int | None = None
    error_bound: float | None = None
    scene_cut_factor: float | None = None
    content_change: float | None = None
    escalation_bound: float | None = None
    escalation_max_tokens: int | None = None

    def __post_init__(self) -> None:
        check_count("refresh_every", self.refresh_every)
        check_number("error_bound", self.error_bound, 0, inclusive=True)
        check_number("scene_cut_factor", self.scene_cut_factor, 1, inclusive=False)
        check_number("content_change", self.content_change, 0, inclusive=False)
        check_count("escalation_max_tokens", self.escalation_max_tokens)
        if self.escalation_max_tokens is not None and self.escalation_bound is None:
            raise ValueError(
                f"escalation_max_tokens={self.escalation_max_tokens} needs an escalation_bound; "
                "expected both, or escalation_max_tokens=None"
            )
        _ = self.escalation  # validates the escalation settings

    @property
    def escalation(self) -> Escalation | None:
        """The gates' `Escalation`, or None without an escalation_bound."""
        if self.escalation_bound is None:
            return None
        return Escalation(self.escalation_bound, self.escalation_max_tokens)

    @property
    def watches_frames(self) -> bool:
        """Whether a trigger compares each frame with the previous one."""
        return self.scene_cut_factor is not None or self.content_change is not None

    def monitor(self, batch_size: int) -> DriftMonitor:
        """The per-stream running state of these triggers for a batch of streams."""
        return DriftMonitor(self, batch_size)


# What `model.stream()` uses unless told otherwise, chosen on real video (BENCHMARKS.md,
# "safe-defaults"); `dataclasses.replace(DEFAULT_DRIFT, refresh_every=60)` changes one setting.
DEFAULT_DRIFT = DriftControl(
    refresh_every=300,
    error_bound=0.1,
    scene_cut_factor=4.0,
    content_change=0.3,
)


@dataclass(frozen=True)
class DriftPlan:
    """What the triggers decided before a step: the events, and what was measured of the frames
    (per stream: change to the previous frames, contrast; the frames as cell means), for
    `DriftMonitor.commit`."""

    events: list[DriftEvent]
    changes: list[float] | None = None
    contrasts: list[float] | None = None
    details: list[float] | None = None
    coarse: Tensor | None = None

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
        self.previous_detail: list[float] = [0.0] * batch_size
        self.dense_contrast: list[float | None] = [None] * batch_size  # at the last dense step

    def state_dict(self) -> dict:
        """A snapshot (copied) of the triggers' running state, for `load_state_dict`."""
        return {
            "last_dense": list(self.last_dense),
            "over_bound": list(self.over_bound),
            "changes": [list(history) for history in self.changes],
            "previous": None if self.previous is None else self.previous.clone(),
            "previous_shape": self.previous_shape,
            "previous_contrast": list(self.previous_contrast),
            "previous_detail": list(self.previous_detail),
            "dense_contrast": list(self.dense_contrast),
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
        self.previous_detail = list(snapshot["previous_detail"])
        # Snapshots from before the contrast trigger hold none: it starts at the next frame.
        self.dense_contrast = list(snapshot.get("dense_contrast", [None] * len(self.last_dense)))

    def take(self, streams: list[int]) -> DriftMonitor:
        """A new monitor with copies of the running state of `streams`, in that order."""
        taken = DriftMonitor(self.control, len(streams))
        snapshot = self.state_dict()
        for name in (
            "last_dense",
            "over_bound",
            "previous_contrast",
            "previous_detail",
            "dense_contrast",
        ):
            setattr(taken, name, [snapshot[name][stream] for stream in streams])
        taken.changes = [
            deque(snapshot["changes"][stream], maxlen=CUT_HISTORY) for stream in streams
        ]
        if self.previous is not None:
            taken.previous = self.previous[streams].clone()
            taken.previous_shape = (len(streams), *self.previous_shape[1:])
        return taken

    @staticmethod
    def cat(monitors: list[DriftMonitor], shifts: list[int]) -> DriftMonitor:
        """One monitor with the streams of `monitors`, in order; `shifts` moves each one's step
        numbers onto the joined stream's count. Frames last seen in another shape are dropped:
        the change triggers restart at the next frame."""
        joined = DriftMonitor(monitors[0].control, sum(len(m.last_dense) for m in monitors))
        joined.last_dense = [
            step + shift for m, shift in zip(monitors, shifts, strict=True) for step in m.last_dense
        ]
        for name in ("over_bound", "previous_contrast", "previous_detail", "dense_contrast"):
            setattr(joined, name, [value for m in monitors for value in getattr(m, name)])
        joined.changes = [deque(h, maxlen=CUT_HISTORY) for m in monitors for h in m.changes]
        shapes = {None if m.previous is None else m.previous_shape[1:] for m in monitors}
        if len(shapes) == 1 and None not in shapes:
            joined.previous = torch.cat([m.previous for m in monitors])
            joined.previous_shape = (joined.previous.shape[0], *shapes.pop())
        return joined

    def plan(self, frames: object, frame: int, fresh: list[bool]) -> DriftPlan:
        """The refreshes due at step `frame` of streams whose `fresh` flag is False."""
        coarse = contrasts = details = changes = None
        if self.control.watches_frames and isinstance(frames, Tensor):
            coarse = _coarse(frames.detach())
            contrasts, details = _contrast(coarse), _detail(coarse)
            changes = self._frame_changes(frames, coarse)
        events = []
        for stream, already_fresh in enumerate(fresh):
            if already_fresh:
                continue
            fired = self._fired(stream, frame, changes, contrasts, details)
            if fired:
                events.append(fired)
        return DriftPlan(events, changes, contrasts, details, coarse)

    def commit(
        self,
        plan: DriftPlan,
        frames: Tensor,
        frame: int,
        dense_streams: list[int],
        unprocessed_share: Tensor | None,
    ) -> None:
        """Record the completed step `frame`, in which `dense_streams` ran densely."""
        for stream in dense_streams:
            self.last_dense[stream] = frame
        if self.control.error_bound is not None and unprocessed_share is not None:
            bound = self.control.error_bound
            self.over_bound = [
                share if share > bound else None for share in unprocessed_share.tolist()
            ]
        if self.control.watches_frames and plan.coarse is not None:
            if plan.changes is None:
                for history in self.changes:
                    history.clear()
            else:
                for history, change in zip(self.changes, plan.changes, strict=True):
                    history.append(change)
            self.previous = plan.coarse.clone()
            self.previous_shape = tuple(frames.shape)
            self.previous_contrast = list(plan.contrasts)
            self.previous_detail = list(plan.details)
            for stream, contrast in enumerate(plan.contrasts):
                if stream in dense_streams or self.dense_contrast[stream] is None:
                    self.dense_contrast[stream] = contrast

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

    def content_ratio(self, stream: int, change: float, contrast: float) -> float:
        """A frame change of `stream` over the larger of its contrast and the previous frame's
        (0 for a change of at most CONTENT_MIN_CHANGE)."""
        if change <= CONTENT_MIN_CHANGE:
            return 0.0
        larger = max(contrast, self.previous_contrast[stream])
        return math.inf if larger == 0 else change / larger

    def content_appears(self, stream: int, change: float, detail: float) -> bool:
        """Whether a frame of `stream` changed by more than CONTENT_MIN_CHANGE and holds
        CONTENT_DETAIL_GROWTH times the previous frame's detail."""
        growth = detail > CONTENT_DETAIL_GROWTH * self.previous_detail[stream]
        return change > CONTENT_MIN_CHANGE and growth

    def contrast_changed(self, stream: int, contrast: float) -> bool:
        """Whether a frame's contrast differs from the contrast at the last dense step of
        `stream` by more than CONTENT_MIN_CHANGE and by a factor above CONTENT_CONTRAST_CHANGE."""
        before = self.dense_contrast[stream]
        if before is None or abs(contrast - before) <= CONTENT_MIN_CHANGE:
            return False
        return max(contrast, before) > CONTENT_CONTRAST_CHANGE * min(contrast, before)

    def _fired(
        self,
        stream: int,
        frame: int,
        changes: list[float] | None,
        contrasts: list[float] | None,
        details: list[float] | None,
    ) -> DriftEvent | None:
        control = self.control
        if changes is not None and control.scene_cut_factor is not None:
            ratio = self.cut_ratio(stream, changes[stream])
            if ratio is not None and ratio > control.scene_cut_factor:
                return DriftEvent(frame, stream, "scene_cut", ratio)
        if changes is not None and control.content_change is not None:
            change = changes[stream]
            ratio = self.content_ratio(stream, change, contrasts[stream])
            if (
                ratio > control.content_change
                or self.content_appears(stream, change, details[stream])
                or self.contrast_changed(stream, contrasts[stream])
            ):
                return DriftEvent(frame, stream, "content_change", ratio)
        if self.over_bound[stream] is not None:
            return DriftEvent(frame, stream, "error", self.over_bound[stream])
        every = control.refresh_every
        if every is not None and frame - self.last_dense[stream] >= every:
            return DriftEvent(frame, stream, "periodic")
        return None

    def _frame_changes(self, frames: Tensor, coarse: Tensor) -> list[float] | None:
        """Per stream, the mean absolute change of `frames` (B, ...) to the previous frames,
        both coarse (`_coarse`); None without a previous frame of the same shape, dtype and
        device."""
        previous = self.previous
        if previous is None or tuple(frames.shape) != self.previous_shape:
            return None
        if coarse.dtype != previous.dtype or coarse.device != previous.device:
            return None
        return (coarse - previous).abs().flatten(1).float().mean(1).tolist()


def _coarse(frames: Tensor) -> Tensor:
    """Images (B, C, H, W) as CUT_GRID x CUT_GRID cell means; other inputs as they are."""
    if frames.ndim == 4 and min(frames.shape[-2:]) > CUT_GRID:
        return F.adaptive_avg_pool2d(frames, CUT_GRID)
    return frames


def _detail(coarse: Tensor) -> list[float]:
    """Per stream, the upper quartile of the absolute differences of neighbouring cells of
    coarse images (B, C, H, W), along rows and columns, averaged over channels: flat letterbox
    bars and their few edges fall below it while they cover less than 3/4 of the frame. The
    contrast (`_contrast`) for other inputs."""
    if coarse.ndim != 4:
        return _contrast(coarse)
    cells = coarse.float()
    across = (cells[..., 1:] - cells[..., :-1]).abs().mean(1).flatten(1)
    down = (cells[..., 1:, :] - cells[..., :-1, :]).abs().mean(1).flatten(1)
    return torch.quantile(torch.cat([across, down], 1), 0.75, dim=1).tolist()


def _contrast(coarse: Tensor) -> list[float]:
    """Per stream, the mean absolute deviation of coarse frames (B, ...) from their mean."""
    flat = coarse.flatten(1).float()
    return (flat - flat.mean(1, keepdim=True)).abs().mean(1).tolist()
