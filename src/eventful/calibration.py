"""Calibrations on real frames.

`calibrate_error_bound`: the largest `ErrorBound` that keeps every frame of some calibration
frames above a target cosine similarity to the dense model (the fewest ops).
`calibrate_fidelity_estimate`: the fit behind a stream's estimate of its own error.

With `max_age`, the policy calibrated is `MaxAge(ErrorBound(bound), max_age)`, which also
renews every token's reference (and cached attention row) at least every `max_age` steps
(BENCHMARKS.md, "camera-motion-bound").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from eventful.core.error_bound import ErrorBound
from eventful.core.estimate import FidelityEstimate, fit_fidelity_estimate
from eventful.core.fingerprint import model_fingerprint
from eventful.core.model import EventfulModule
from eventful.core.policies import Policy, TopFraction
from eventful.core.staleness import MaxAge
from eventful.evaluation import feature_cosine, output_tokens


@dataclass(frozen=True)
class BoundTrial:
    """One pass over the calibration frames under `ErrorBound(bound)`.

    min_cosine: the lowest per-frame patch-feature cosine to the dense model, over the frames
    run (a pass stops at its first frame below the target); op_ratio: dense over eventful
    multiply-accumulates of those frames, the first (dense) one included.
    """

    bound: float
    min_cosine: float
    mean_cosine: float
    op_ratio: float
    frames: int
    meets_target: bool


@dataclass(frozen=True)
class Calibration:
    """The calibrated bound (the largest one tried that met the target) and every trial."""

    bound: float
    target_cosine: float
    max_age: int | None = None
    trials: list[BoundTrial] = field(default_factory=list)

    @property
    def policy(self) -> Policy:
        """`ErrorBound(bound)`, wrapped in `MaxAge` when calibrated with a max age."""
        return bounded_policy(self.bound, self.max_age)

    @property
    def chosen(self) -> BoundTrial:
        """The full pass at the calibrated bound."""
        return next(t for t in self.trials if t.bound == self.bound and t.meets_target)


def bounded_policy(bound: float, max_age: int | None = None) -> Policy:
    policy = ErrorBound(bound)
    return policy if max_age is None else MaxAge(policy, max_age)


@torch.no_grad()
def run_bound(
    converted: EventfulModule,
    frames: Sequence[Tensor],
    dense_tokens: Sequence[Tensor],
    bound: float,
    target_cosine: float,
    max_age: int | None = None,
    skip_tokens: int = 1,
) -> BoundTrial:
    """One fresh single stream of `converted` under `ErrorBound(bound)` (in `MaxAge` with a
    `max_age`) over `frames` (each (1, C, H, W)), stopping at the first frame whose cosine
    falls below the target. Drift control is off: the bound alone is measured."""
    converted.policy = bounded_policy(bound, max_age)
    stream = converted.stream(batch_size=1, drift=None)
    cosines, macs, dense_macs = [], 0, 0
    for frame, reference in zip(frames, dense_tokens, strict=True):
        tokens = output_tokens(stream(frame))
        cosines.append(feature_cosine(tokens, reference, skip_tokens).item())
        macs += stream.ops.total
        dense_macs += stream.ops.dense
        if cosines[-1] < target_cosine:
            break
    return BoundTrial(
        bound=bound,
        min_cosine=min(cosines),
        mean_cosine=sum(cosines) / len(cosines),
        op_ratio=dense_macs / macs,
        frames=len(cosines),
        meets_target=min(cosines) >= target_cosine and len(cosines) == len(frames),
    )


def calibrate_error_bound(
    dense: nn.Module,
    converted: EventfulModule,
    frames: Sequence[Tensor],
    target_cosine: float = 0.98,
    max_age: int | None = None,
    initial_bound: float = 1.0,
    bracket_steps: int = 12,
    refine_steps: int = 6,
    skip_tokens: int = 1,
) -> Calibration:
    """The largest `ErrorBound` under which every frame of `frames` (each (1, C, H, W), run as
    one stream from a fresh state) keeps a patch-feature cosine >= `target_cosine` to `dense`;
    with `max_age`, of `MaxAge(ErrorBound(bound), max_age)`.

    Brackets the bound by factors of 4 from `initial_bound` (at most `bracket_steps` passes),
    then bisects the bracket geometrically (`refine_steps` passes); assumes, as measured, that
    fidelity falls as the bound grows. A pass stops at its first frame below the target, so
    failing bounds cost little. `ErrorBound(0)` equals the dense model, so the search always has
    an answer; it is 0 if no positive bound tried meets the target. The converted model's
    policy is restored afterwards.
    """
    if (
        isinstance(target_cosine, bool)
        or not isinstance(target_cosine, (int, float))
        or not -1.0 < target_cosine <= 1.0
    ):
        raise ValueError(f"target_cosine must be in (-1, 1], got {target_cosine!r}")
    if (
        isinstance(initial_bound, bool)
        or not isinstance(initial_bound, (int, float))
        or not math.isfinite(initial_bound)
        or initial_bound <= 0
    ):
        raise ValueError(f"initial_bound must be a finite number > 0, got {initial_bound!r}")
    if max_age is not None:
        MaxAge(ErrorBound(0.0), max_age)  # raises ValueError on a bad max_age
    frames = list(frames)
    if not frames:
        raise ValueError("expected at least one calibration frame, got none")
    with torch.no_grad():
        dense_tokens = [output_tokens(dense(frame)) for frame in frames]
    saved_policy = converted.policy
    trials: list[BoundTrial] = []

    def meets(bound: float) -> bool:
        trial = run_bound(
            converted, frames, dense_tokens, bound, target_cosine, max_age, skip_tokens
        )
        trials.append(trial)
        return trial.meets_target

    try:
        good, bad = _bracket(meets, float(initial_bound), bracket_steps)
        for _ in range(refine_steps if good > 0 and bad is not None else 0):
            middle = math.sqrt(good * bad)
            if meets(middle):
                good = middle
            else:
                bad = middle
        if good == 0.0:
            meets(0.0)
    finally:
        converted.policy = saved_policy
    return Calibration(good, float(target_cosine), max_age, trials)


def _bracket(meets, start: float, steps: int) -> tuple[float, float | None]:
    """(largest bound found to meet the target or 0, smallest found to fail or None)."""
    if meets(start):
        good, bad = start, None
        for _ in range(steps):
            if not meets(good * 4):
                return good, good * 4
            good *= 4
        return good, bad
    bad = start
    for _ in range(steps):
        if meets(bad / 4):
            return bad / 4, bad
        bad /= 4
    return 0.0, bad


@torch.no_grad()
def calibrate_fidelity_estimate(
    dense: nn.Module,
    converted: EventfulModule,
    clips: Sequence[Sequence[Tensor]],
    policies: Sequence[Policy] | None = None,
    quantile: float = 0.9,
    skip_tokens: int = 1,
) -> FidelityEstimate:
    """Fit the fidelity estimate of `converted` (`eventful.core.estimate`) on real frames.

    Each clip (frames (1, C, H, W)) runs as a fresh stream under each policy (default: a tenth,
    a quarter and half of the tokens, so that the unprocessed share spans a wide range), with
    drift control off, next to `dense`; every step's mean unprocessed share is paired with its
    measured patch-feature cosine. The converted model's policy is restored afterwards.
    """
    if policies is None:
        policies = [TopFraction(0.1), TopFraction(0.25), TopFraction(0.5)]
    clips = [list(clip) for clip in clips]
    if not any(clips):
        raise ValueError("expected at least one clip with frames to calibrate on, got none")
    saved_policy = converted.policy
    shares: list[float] = []
    cosines: list[float] = []
    try:
        for clip in clips:
            references = [output_tokens(dense(frame)) for frame in clip]
            for policy in policies:
                converted.policy = policy
                stream = converted.stream(drift=None)
                for frame, reference in zip(clip, references, strict=True):
                    tokens = output_tokens(stream(frame))
                    shares.append(stream.trace.unprocessed_share.item())
                    cosines.append(feature_cosine(tokens, reference, skip_tokens).item())
    finally:
        converted.policy = saved_policy
    fingerprint = model_fingerprint(converted.encoder)
    return fit_fidelity_estimate(shares, cosines, fingerprint, converted.levels, quantile)
