"""Budget controllers: policies that pick, every step, how many tokens each stream re-processes
so that the ops or the wall time per frame meet a budget, which may change at any frame.

A controller picks one k for every block, gate and stream of a step and selects, per stream,
the k tokens of largest error (as `TopK(k)`): shapes stay static and a batch of B streams costs
B times one stream. It learns from each finished step through `Policy.observe`, which `Stream`
calls; without observations it keeps its current k.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from torch import Tensor, nn

from eventful.core.ops import dense_macs, largest_topk_within, steady_topk_macs
from eventful.core.policies import (
    Policy,
    StepReport,
    _check_norm,
    _is_real,
    parse_policy,
    select_largest,
)
from eventful.core.selection import Selection


class BudgetPolicy(Policy):
    """Base of the controllers: top-k selection with a k they adjust, and a budget to meet.

    `budget` (or `set_budget`) changes the budget at any frame; the next step follows it. `k`
    is None until the policy has seen its input (`validate`, run by the model at each step).
    """

    unit = ""

    def __init__(self, budget: float, norm: float) -> None:
        self._budget = self._checked(budget)
        self.norm = _check_norm(norm)
        self.k: int | None = None
        self.num_tokens: int | None = None

    @property
    def budget(self) -> float:
        return self._budget

    @budget.setter
    def budget(self, value: float) -> None:
        self.set_budget(value)

    def set_budget(self, value: float) -> None:
        """Change the budget; raises ValueError (and keeps the old one) if it is out of range."""
        self._budget = self._checked(value)
        if self.k is not None:
            self._choose_k()

    def select(self, error_norms: Tensor) -> Selection:
        if self.k is None:
            raise RuntimeError(f"{self!r} has not seen its input yet: call validate first")
        return select_largest(error_norms, self.k)

    def largest_count(self, num_tokens: int) -> int | None:
        return self.k

    def _checked(self, value: object) -> float:
        if not _is_real(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"{type(self).__name__} expects a positive, finite budget in {self.unit}, "
                f"got {value!r}"
            )
        return float(value)

    def _choose_k(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._budget})"


class OpsBudget(BudgetPolicy):
    """Keeps the ops per frame of each stream at `gops_per_frame` (1e9 multiply-accumulates).

    "Ops" are multiply-accumulates as `eventful.core.ops` counts them: per stream and frame,
    the figure `stream.ops` reports (`stream.ops.total` for one stream, `ops.per_stream` for
    each of a batch). k is the largest whose steady `TopK(k)` step the op model of
    `eventful.core.ops` predicts within a target: the budget minus 1/`horizon` of the *debt*,
    the measured ops of past steps (`observe`) minus the budget in force at each. So the extra
    ops of dense steps (the first, refreshes) and of rows the exact and full levels recompute
    are paid back over the next frames, and the average over a clip meets the budget. The
    debt is held within one dense step's ops, so a budget out of reach for a while is not paid
    back long after. Without observations (no `Stream`, or `count_ops=False`) k follows the op
    model alone.

    The budget covers the whole model, its head included (category "head" of `stream.ops`):
    the head's ops of the last step come off the target before k is chosen.

    The budget must lie between the ops of k = 1 and those of the dense encoder for the input:
    checked (ValueError) when the policy first sees a model or input size, and when changed.
    A head adds its own ops on top, known once it has run: a budget below them and the encoder's
    k = 1 ops is out of reach, and the stream runs k = 1.
    """

    unit = "GMACs per frame"

    def __init__(self, gops_per_frame: float, horizon: int = 8, norm: float = 2) -> None:
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"OpsBudget expects a positive integer horizon, got {horizon!r}")
        self.horizon = horizon
        self.blocks: nn.ModuleList | None = None
        self.debt = 0.0  # multiply-accumulates per stream spent beyond the budget
        self.head_macs = 0.0  # per stream, the head's ops at the last observed step
        self._macs_range = (0, 0)  # per stream: k = 1, dense
        super().__init__(gops_per_frame, norm)

    def validate(self, num_tokens: int, blocks: nn.ModuleList | None = None) -> None:
        if blocks is None:
            raise ValueError(
                f"{self!r} predicts ops from the model: expected its eventful blocks, got None"
            )
        if blocks is self.blocks and num_tokens == self.num_tokens:
            return
        macs_range = (steady_topk_macs(blocks, num_tokens, 1), dense_macs(blocks, num_tokens))
        self._check_range(self._budget, macs_range, num_tokens)
        self.blocks, self.num_tokens, self._macs_range = blocks, num_tokens, macs_range
        self.debt = 0.0
        self.head_macs = 0.0
        self._choose_k()

    def set_budget(self, value: float) -> None:
        if self.blocks is not None:
            self._check_range(self._checked(value), self._macs_range, self.num_tokens)
        super().set_budget(value)

    def observe(self, report: StepReport) -> None:
        if report.ops is None or self.blocks is None:
            return
        streams = len(report.ops.per_stream)
        measured = report.ops.total / streams
        self.head_macs = report.ops.by_category["head"] / streams
        dense = self._macs_range[1]
        self.debt = min(max(self.debt + measured - self._budget * 1e9, -dense), dense)
        self._choose_k()

    def _choose_k(self) -> None:
        target = self._budget * 1e9 - self.debt / self.horizon - self.head_macs
        self.k = max(1, largest_topk_within(self.blocks, self.num_tokens, target))

    def _check_range(self, gops: float, macs_range: tuple[int, int], num_tokens: int) -> None:
        low, high = (macs / 1e9 for macs in macs_range)
        expected = f"expected a budget from {low:.6g} to {high:.6g} GMACs per frame"
        if gops < low:
            raise ValueError(
                f"OpsBudget({gops}) is below the {low:.6g} GMACs per frame that one token per "
                f"stream (k=1) costs on this model at {num_tokens} tokens; {expected}"
            )
        if gops > high:
            raise ValueError(
                f"OpsBudget({gops}) exceeds the {high:.6g} GMACs per frame of the dense model "
                f"at {num_tokens} tokens; {expected}"
            )


class LatencyBudget(BudgetPolicy):
    """Keeps the wall time of a step at `ms_per_frame` milliseconds (the whole batch's step).

    Time is modelled as a + b x, x being the tokens each stream processed in the step (the
    controller's k; every token for a stream that ran densely; averaged over the batch), and
    fitted by least squares over the last `window` steps that `observe` reports (a `Stream`
    times each step with its `clock`). Without enough spread in x for a slope, time is taken as
    proportional to x. When a step's time strays from the fit by more than `tolerance`
    (relative), the machine is taken to have changed speed and older steps are dropped, so a
    slowdown or speed-up is followed within a few frames. k is the largest that the fit puts
    within the budget, between 1 and every token; before the first observation it is every
    token. A budget below the time of one token gives k = 1.
    """

    unit = "milliseconds per frame"
    needs_wall_time = True

    def __init__(
        self, ms_per_frame: float, window: int = 8, tolerance: float = 0.3, norm: float = 2
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"LatencyBudget expects an integer window >= 2, got {window!r}")
        if not _is_real(tolerance) or not tolerance > 0:
            raise ValueError(f"LatencyBudget expects a tolerance > 0, got {tolerance!r}")
        self.tolerance = float(tolerance)
        self.steps: deque[tuple[float, float]] = deque(maxlen=window)  # (tokens, seconds)
        super().__init__(ms_per_frame, norm)

    def validate(self, num_tokens: int, blocks: nn.ModuleList | None = None) -> None:
        if num_tokens != self.num_tokens:
            self.num_tokens = num_tokens
            self.steps.clear()
            self.k = num_tokens

    def observe(self, report: StepReport) -> None:
        if self.num_tokens is None or not report.seconds > 0:
            return
        dense = len(report.fresh_streams)
        tokens = (dense * self.num_tokens + (report.batch_size - dense) * self.k) / (
            report.batch_size
        )
        fit = self.fit()
        if fit is not None:
            predicted = fit[0] + fit[1] * tokens
            if abs(report.seconds - predicted) > self.tolerance * predicted:
                self.steps.clear()
        self.steps.append((tokens, report.seconds))
        self._choose_k()

    def fit(self) -> tuple[float, float] | None:
        """(a seconds, b seconds per token) of the time model, None before any observation."""
        if not self.steps:
            return None
        tokens = [x for x, _ in self.steps]
        seconds = [t for _, t in self.steps]
        if max(tokens) - min(tokens) >= max(2.0, 0.05 * self.num_tokens):
            slope, intercept = statistics.linear_regression(tokens, seconds)
            if slope > 0 and intercept >= 0:
                return intercept, slope
        return 0.0, sum(seconds) / sum(tokens)

    def _choose_k(self) -> None:
        fit = self.fit()
        if fit is None:
            return
        intercept, slope = fit
        within = math.floor((self._budget / 1000 - intercept) / slope)
        self.k = min(max(within, 1), self.num_tokens)


def parse_schedule(text: str) -> list[tuple[int, Policy]]:
    """A budget schedule from its command-line form `FRAME:POLICY,FRAME:POLICY,...`.

    From each FRAME on (0 = the first frame), POLICY (any `parse_policy` form) is in force,
    e.g. `0:fraction:0.5,100:ops:1.5,200:latency:40`. Frames are distinct integers >= 0 in
    increasing order.
    """
    schedule: list[tuple[int, Policy]] = []
    for entry in text.split(","):
        frame_text, _, policy_text = entry.strip().partition(":")
        try:
            frame = int(frame_text)
        except ValueError:
            frame = None
        if frame is None or not policy_text:
            raise ValueError(
                f"malformed budget schedule entry {entry!r}; expected FRAME:POLICY, "
                "for example 100:ops:1.5"
            )
        if frame < 0:
            raise ValueError(f"budget schedule frame {frame} is negative; expected frames >= 0")
        if schedule and frame <= schedule[-1][0]:
            previous = schedule[-1][0]
            problem = "appears twice" if frame == previous else f"follows frame {previous}"
            raise ValueError(
                f"budget schedule frame {frame} {problem}; expected distinct frames in "
                "increasing order"
            )
        schedule.append((frame, parse_policy(policy_text)))
    return schedule


def scheduled_policy(current: Policy, entry: Policy) -> Policy:
    """The policy in force after a schedule entry: a controller of the entry's kind takes the
    entry's budget and keeps what it learned; any other change takes the entry itself."""
    if isinstance(current, BudgetPolicy) and type(current) is type(entry):
        current.budget = entry.budget
        return current
    return entry
