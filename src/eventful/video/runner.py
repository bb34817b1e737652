"""Run an eventful model over a video, frame by frame, and record what it saves and costs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import eventful
from eventful.core.budget import LatencyBudget, OpsBudget, scheduled_policy
from eventful.core.drift import DEFAULT_DRIFT, DriftControl, DriftEvent
from eventful.core.fidelity_policy import CALIBRATE, Fidelity
from eventful.core.ops import OpCount
from eventful.core.policies import Policy
from eventful.core.precision import resolve_precision
from eventful.evaluation import feature_cosine, output_tokens, saliency_mae
from eventful.methods.iared2 import IARed2Model, KeepRule
from eventful.methods.iared2_train import keep_share
from eventful.models.saliency import SaliencyOutput
from eventful.profile import part
from eventful.video.decode import VideoReader
from eventful.zoo import ZooModel


@dataclass
class FrameResult:
    """One decoded frame: its cost, its time and, with a comparison, its distance to dense."""

    index: int
    macs: int  # the whole model's, head included
    dense_macs: int
    updated_fraction: float
    ms: float
    policy: str = ""  # the policy in force, as repr() writes it
    budget_gops: float | None = None  # the OpsBudget in force
    budget_ms: float | None = None  # the LatencyBudget in force
    events: list[DriftEvent] = field(default_factory=list)  # refreshes and resets at this frame
    dense_ms: float | None = None
    feature_cosine: float | None = None
    saliency_mae: float | None = None
    estimated_cosine: float | None = None  # the engine's own estimate of feature_cosine
    head_macs: int = 0  # the part of macs the head ran
    head_dense_macs: int = 0  # the part of dense_macs the dense head runs
    # The dense model at the run's precision (the engine's dense step), with --compare at a
    # precision other than fp32: its time and its feature cosine to the float32 dense model.
    same_precision_ms: float | None = None
    same_precision_cosine: float | None = None
    decode_ms: float = 0.0  # decoding the frame from the video
    preprocess_ms: float = 0.0  # resizing and normalising it into the model's input


@dataclass
class FrameView:
    """What the per-frame callbacks see, beyond the numbers: for progress and visualisation."""

    result: FrameResult
    image: Tensor  # the model input (3, S, S)
    updated_tokens: Tensor  # (T,) fraction of blocks that re-processed each token
    saliency: Tensor | None  # (S, S) in [0, 1]


@dataclass
class RunResult:
    video: str
    model: ZooModel
    policy: Policy
    level: str
    compare: bool
    device: str
    fps: float
    tokens: int
    frames: list[FrameResult] = field(default_factory=list)
    frames_failed: int = 0
    notes: list[str] = field(default_factory=list)
    drift: DriftControl | None = None
    schedule: list[tuple[int, Policy]] = field(default_factory=list)
    precision: str = "fp32"

    def median_ms(self, dense: bool = False, part: str | None = None) -> float | None:
        """Median wall time per frame over the frames after the first: of the eventful model,
        of the dense model (`dense`), or of a `part` of the pipeline ("decode", "preprocess",
        "same_precision": the dense model at the run's precision)."""
        if part is not None:
            times = [getattr(f, f"{part}_ms") for f in self.frames[1:]]
        else:
            times = [f.dense_ms if dense else f.ms for f in self.frames[1:]]
        times = [t for t in times if t is not None]
        return statistics.median(times) if times else None


def run_video(
    video: str | Path,
    model: ZooModel,
    policy: Policy,
    level: str = "exact",
    compare: bool = False,
    max_frames: int | None = None,
    device: str = "cpu",
    on_frame: Callable[[FrameView], None] | None = None,
    drift: DriftControl | None = DEFAULT_DRIFT,
    schedule: Sequence[tuple[int, Policy]] = (),
    iared2: IARed2Model | None = None,
    precision: str = "fp32",
) -> RunResult:
    """Stream `video` through the eventful copy of `model.dense`, one frame per step.

    A change of the decoded frame size resets the stream (its next step is dense), adds a
    note and a "resolution" event. `drift` refreshes the stream on its triggers (None: off);
    the model's shipped fidelity estimate, where it has one for `level`, gives every frame its
    estimated cosine (else a note says there is none); `schedule`
    (frame, policy) pairs put a policy in force from a frame on (`scheduled_policy`: a budget
    controller of the same kind changes its budget). With `iared2` (an `IARed2Model` of
    `model.dense` with trained interpreters) the frames run through it instead, each on its
    own, and `policy` is its `KeepRule`; level, drift and schedule do not apply. `precision`:
    of the encoder's linear layers (`eventful.convert`); the fidelity reference stays the
    float32 dense model, and with `compare` at another precision the dense model at that
    precision (the engine's dense step) is timed and compared too. Raises `VideoError` when
    the video cannot be read, ValueError for bad settings.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    precision = resolve_precision(precision, device)
    if iared2 is not None and precision != "fp32":
        raise ValueError("precision applies to the eventful method only, not IA-RED^2")
    reader = VideoReader(video, max_frames)
    dense = model.dense.to(device)
    size = model.input_size
    notes = []
    same_precision = None
    if iared2 is None:
        converted = eventful.convert(dense, policy=policy, level=level, precision=precision)
        converted = converted.to(device)
        if compare and precision != "fp32":
            same_precision = DenseSteps(
                eventful.convert(dense, policy=policy, level=level, precision=precision).to(device)
            )
        estimate = model.fidelity_estimate(converted.levels)
        entries = [policy, *(scheduled for _, scheduled in schedule)]
        unbound = [e for e in entries if isinstance(e, Fidelity) and e.estimate is None]
        if unbound and estimate is None:
            raise ValueError(
                f"--policy cosine: needs a fidelity estimate, and {model.name} ships none for "
                f"level {level}: {CALIBRATE}"
            )
        stream = converted.stream(batch_size=1, check_finite=False, drift=drift, estimate=estimate)
        # Fidelity policies read the model's estimate (the stream bound it to the first one).
        schedule = [(frame, _with_estimate(entry, estimate)) for frame, entry in schedule]
        tokens = converted.encoder.embedding.num_tokens(size, size)
        blocks = converted.encoder.blocks
        for entry in [converted.policy, *(scheduled for _, scheduled in schedule)]:
            entry.validate(tokens, blocks)
        if estimate is None:
            notes.append(f"no fidelity estimate is calibrated for {model.name} at level {level}")
        dense_head = getattr(converted, "dense_head_layers", [])
        if dense_head:
            notes.append(
                f"the head layers {', '.join(dense_head)} are not local convolutions: they ran "
                "densely on every frame"
            )
    else:
        if schedule:
            raise ValueError("IA-RED^2 keeps by its interpreters' scores: it takes no schedule")
        converted, estimate = None, None
        stream = DroppingStream(iared2.to(device), policy)
        tokens = iared2.dropping.embedding.num_tokens(size, size)
        level = "iared2"
        notes.append(
            "IA-RED^2: ops count the encoder only (the head runs densely); the updated-tokens "
            "panel shows each token's keep probability where it was last scored"
        )
    changes = dict(schedule)
    result = RunResult(
        video=str(video),
        model=model,
        policy=policy,
        level=level,
        compare=compare,
        device=device,
        fps=reader.fps,
        tokens=tokens,
        drift=drift if iared2 is None else None,
        schedule=list(schedule),
        notes=notes,
        precision=precision,
    )
    frame_size = None
    for index, (rgb, decode_ms) in enumerate(_decoded(reader)):
        events = []
        if frame_size is not None and rgb.shape[:2] != frame_size:
            stream.reset()
            events.append(DriftEvent(index, 0, "resolution"))
            result.notes.append(
                f"frame {index}: resolution changed from {frame_size[1]}x{frame_size[0]} to "
                f"{rgb.shape[1]}x{rgb.shape[0]}; stream reset"
            )
        if index in changes:
            converted.policy = scheduled_policy(converted.policy, changes[index])
        in_force = policy if converted is None else converted.policy
        frame_size = rgb.shape[:2]
        start = time.perf_counter()
        with part("preprocess"):
            image = model.preprocess(rgb)
            batch = image.unsqueeze(0).to(device)
        preprocess_ms = (time.perf_counter() - start) * 1000
        output, ms = _timed(stream, batch, device)
        frame = FrameResult(
            index=index,
            macs=stream.ops.total,
            dense_macs=stream.ops.dense,
            head_macs=stream.ops.head,
            head_dense_macs=stream.ops.head_dense,
            decode_ms=decode_ms,
            preprocess_ms=preprocess_ms,
            updated_fraction=stream.updated_fraction()[0],
            ms=ms,
            policy=repr(in_force),
            budget_gops=in_force.budget if isinstance(in_force, OpsBudget) else None,
            budget_ms=in_force.budget if isinstance(in_force, LatencyBudget) else None,
            events=events + stream.events,
            estimated_cosine=None if estimate is None else stream.estimated_cosine[0],
        )
        if compare:
            with part("dense"):
                reference, frame.dense_ms = _timed(dense, batch, device)
            cosine = feature_cosine(
                output_tokens(output), output_tokens(reference), model.num_prefix_tokens
            )
            frame.feature_cosine = cosine.item()
            if same_precision is not None:
                with part("dense"):
                    at_precision, frame.same_precision_ms = _timed(same_precision, batch, device)
                frame.same_precision_cosine = feature_cosine(
                    output_tokens(at_precision), output_tokens(reference), model.num_prefix_tokens
                ).item()
            if isinstance(output, SaliencyOutput):
                area = model.frame_area(*rgb.shape[:2])
                frame.saliency_mae = saliency_mae(output.saliency, reference.saliency, area).item()
        result.frames.append(frame)
        result.frames_failed = reader.frames_failed
        if on_frame is not None:
            saliency = output.saliency[0, 0] if isinstance(output, SaliencyOutput) else None
            on_frame(FrameView(frame, image, stream.updated_tokens(), saliency))
    result.frames_failed = reader.frames_failed
    if reader.stopped_early:
        result.notes.append(reader.stopped_early)
    return result


def _with_estimate(policy: Policy, estimate) -> Policy:
    """`policy`, reading `estimate` if it is a `Fidelity` policy without one."""
    if isinstance(policy, Fidelity) and policy.estimate is None and estimate is not None:
        return policy.bound_to(estimate)
    return policy


def _decoded(reader: VideoReader) -> Iterator[tuple[np.ndarray, float]]:
    """Each frame of `reader`, with the milliseconds its decoding took."""
    frames = iter(reader)
    while True:
        start = time.perf_counter()
        with part("decode"):
            rgb = next(frames, None)
        if rgb is None:
            return
        yield rgb, (time.perf_counter() - start) * 1000


@torch.no_grad()
def _timed(call: Callable, batch: Tensor, device: str):
    """call(batch) and its wall time in milliseconds."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = call(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return value, (time.perf_counter() - start) * 1000


class DenseSteps:
    """A converted model's dense steps: a stream reset before every frame."""

    def __init__(self, converted) -> None:
        self.stream = converted.stream(batch_size=1, check_finite=False, drift=None)

    def __call__(self, frames: Tensor) -> object:
        self.stream.reset()
        return self.stream(frames)


class DroppingStream:
    """IA-RED^2 as the runner drives a stream: one call per frame (no state between frames),
    with the ops and the tokens of the last call."""

    def __init__(self, model: IARed2Model, rule: KeepRule) -> None:
        self.model = model
        self.rule = rule
        self.ops: OpCount | None = None
        self.events: list[DriftEvent] = []

    def __call__(self, frames: Tensor) -> object:
        output = self.model(frames, self.rule)
        last = self.model.last
        dense = self.model.dropping.dense_macs(frames)
        self.ops = OpCount(
            per_stream=[
                {"linear": macs, "attention": 0, "adds": 0, "gates": 0, "head": 0}
                for macs in last.macs
            ],
            dense_per_stream=[dense] * frames.shape[0],
            head_dense_per_stream=[0] * frames.shape[0],
        )
        return output

    def updated_fraction(self) -> list[float]:
        """Per stream: the share of the blocks' patch tokens processed."""
        return keep_share(self.model.dropping, self.model.last.kept).tolist()

    def updated_tokens(self, stream: int = 0) -> Tensor:
        """(T,): the prefix tokens at 1, each patch at the keep probability of the last group
        that scored it."""
        last = self.model.last
        scores = last.probabilities[0][stream].clone()
        for probabilities, kept in zip(last.probabilities[1:], last.kept, strict=False):
            scores = torch.where(kept[stream], probabilities[stream], scores)
        prefix = self.model.dropping.embedding.num_prefix_tokens
        return torch.cat([scores.new_ones(prefix), scores])

    def reset(self) -> None:
        """Nothing is kept between frames."""
