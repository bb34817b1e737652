"""Policies: map per-token error norms (B, N) to the tokens each stream re-processes.

TopK, TopFraction and Threshold are stateless. The budget controllers of
`eventful.core.budget` learn from each finished step through `Policy.observe`. Any policy may
be swapped between steps without resetting a stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from eventful.core.selection import Selection

if TYPE_CHECKING:
    from eventful.core.ops import OpCount

_NORMS = (1, 2, math.inf)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_norm(norm: float) -> float:
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of 1, 2 or math.inf, got {norm!r}")
    return norm


@dataclass(frozen=True)
class StepReport:
    """What a policy may learn from a finished step: `Stream` passes one to `Policy.observe`.

    seconds: wall time of the step by the stream's clock; fresh_streams: the streams that ran
    densely; ops: the step's multiply-accumulates (None when the stream does not count ops).
    """

    seconds: float
    batch_size: int
    fresh_streams: list[int]
    ops: OpCount | None


class Policy:
    """Base class. `norm` is the order of the per-token vector norm of the gate error.

    `needs_wall_time`: `observe` reads the step's wall time, so a `Stream` on CUDA waits for the
    device at the end of each step to measure it. `needs_gate_size`: the gates call
    `select_within_size` with their size instead of `select` (`Fidelity`).
    """

    norm: float = 2
    needs_wall_time: bool = False
    needs_gate_size: bool = False

    def validate(self, num_tokens: int, blocks: nn.ModuleList | None = None) -> None:
        """Raise ValueError if the policy cannot run on inputs of `num_tokens` tokens.

        `blocks`, the eventful blocks the policy is about to serve, lets a policy that predicts
        ops (OpsBudget) check itself against the model.
        """

    def select(self, error_norms: Tensor) -> Selection:
        raise NotImplementedError

    def select_within_size(self, error_norms: Tensor, size: Tensor) -> Selection:
        """`select`, told each stream's gate size (B,): N times the gate's scale, the unit of
        its unprocessed share (`eventful.core.gates`)."""
        return self.select(error_norms)

    def tokens_per_stream(self, num_tokens: int) -> int | None:
        """The tokens each stream selects at every gate for inputs of `num_tokens` tokens, when
        the policy fixes that count (TopK, TopFraction); None when it varies."""
        return None

    def largest_count(self, num_tokens: int) -> int | None:
        """k, where this step's `select` takes each stream's k tokens of largest error
        (`select_largest`) for inputs of `num_tokens` tokens; else None. The blocks then may
        take their lean step (`EventfulBlock._lean_forward`)."""
        return None

    def observe(self, report: StepReport) -> None:
        """Feedback after each step (a `Stream` calls it); stateless policies ignore it."""

    def select_among(self, error_norms: Tensor, allowed: Tensor) -> Selection:
        """Select only among the tokens `allowed` (B, N) marks (a token reduction,
        `eventful.core.reduction`): by default the policy's own choice with the other tokens'
        errors at 0, cut to the allowed ones."""
        chosen = self.select(error_norms.masked_fill(~allowed, 0.0))
        return Selection.from_mask(chosen.mask() & allowed)

    def for_block(self, block_state: dict[str, Tensor], fresh_streams: list[int]) -> Policy:
        """The policy that serves one block's gates in this step; the model asks before each
        block. Stateless policies serve themselves; a policy with per-stream, per-token state
        (`MaxAge`) keeps it in `block_state`, so that it is saved, moved and reset with the
        stream, and learns from `fresh_streams` which streams run densely (their first step or
        a reset)."""
        return self


def select_largest(error_norms: Tensor, k: int) -> Selection:
    """Each stream's k tokens of largest error (B, N): equal counts, static shapes, no sync.
    With k = N, every token: the dense path, without a sort or an index."""
    if k >= error_norms.shape[1]:
        return Selection.all_tokens(*error_norms.shape, error_norms.device)
    index = error_norms.topk(k, dim=1, sorted=False).indices
    return Selection.from_indices(index, error_norms.shape[1])


class TopK(Policy):
    """Each stream re-processes its k tokens of largest error. Static shapes; no sync."""

    def __init__(self, k: int, norm: float = 2) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TopK expects a positive integer k, got {k!r}")
        self.k = k
        self.norm = _check_norm(norm)

    def validate(self, num_tokens: int, blocks: nn.ModuleList | None = None) -> None:
        if self.k > num_tokens:
            raise ValueError(
                f"TopK(k={self.k}) exceeds the {num_tokens} tokens of this input; "
                f"expected 1 <= k <= {num_tokens}"
            )

    def select(self, error_norms: Tensor) -> Selection:
        return select_largest(error_norms, self.k)

    def tokens_per_stream(self, num_tokens: int) -> int | None:
        return self.k

    def largest_count(self, num_tokens: int) -> int | None:
        return self.k

    def __repr__(self) -> str:
        return f"TopK({self.k})"


class TopFraction(Policy):
    """Each stream re-processes round(fraction * N) tokens (at least one) of largest error.

    `round` is Python's: a count that falls half-way goes to the even neighbour (2.5 -> 2).
    """

    def __init__(self, fraction: float, norm: float = 2) -> None:
        if not _is_real(fraction) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"TopFraction expects a fraction in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)
        self.norm = _check_norm(norm)

    def count(self, num_tokens: int) -> int:
        return max(1, round(self.fraction * num_tokens))

    def select(self, error_norms: Tensor) -> Selection:
        return select_largest(error_norms, self.count(error_norms.shape[1]))

    def select_among(self, error_norms: Tensor, allowed: Tensor) -> Selection:
        """The fraction of each stream's allowed tokens (round, at least one) of largest
        error."""
        counts = (allowed.sum(dim=1) * self.fraction).round().clamp(min=1)
        ranked = error_norms.masked_fill(~allowed, float("-inf"))
        order = ranked.argsort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
        )
        return Selection.from_mask((rank < counts.unsqueeze(1)) & allowed)

    def tokens_per_stream(self, num_tokens: int) -> int | None:
        return self.count(num_tokens)

    def largest_count(self, num_tokens: int) -> int | None:
        return self.count(num_tokens)

    def __repr__(self) -> str:
        return f"TopFraction({self.fraction})"


class Threshold(Policy):
    """Each stream re-processes the tokens whose error norm is at least `threshold`.

    Counts differ between streams. `min_tokens` and `max_tokens` bound them: a stream takes at
    least its `min_tokens` and at most its `max_tokens` tokens of largest error (ties broken
    arbitrarily); a ceiling above the token count does nothing. `Threshold(0)` selects every
    token. The per-stream counts size the work, so on CUDA building the selection reads them
    back to the host once per gate; on the CPU nothing waits.
    """

    def __init__(
        self,
        threshold: float,
        norm: float = 2,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
    ) -> None:
        if not _is_real(threshold) or not threshold >= 0.0:
            raise ValueError(f"Threshold expects a threshold >= 0, got {threshold!r}")
        for name, value in (("min_tokens", min_tokens), ("max_tokens", max_tokens)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
            raise ValueError(
                f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens}); "
                "expected min_tokens <= max_tokens"
            )
        self.threshold = float(threshold)
        self.norm = _check_norm(norm)
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens

    def validate(self, num_tokens: int, blocks: nn.ModuleList | None = None) -> None:
        if self.min_tokens is not None and self.min_tokens > num_tokens:
            raise ValueError(
                f"Threshold(min_tokens={self.min_tokens}) exceeds the {num_tokens} tokens of "
                f"this input; expected min_tokens <= {num_tokens}"
            )

    def select(self, error_norms: Tensor) -> Selection:
        mask = error_norms >= self.threshold
        num_tokens = error_norms.shape[1]
        if self.max_tokens is not None and self.max_tokens < num_tokens:
            mask &= _largest(error_norms, self.max_tokens)
        if self.min_tokens is not None:
            mask |= _largest(error_norms, self.min_tokens)
        return Selection.from_mask(mask)

    def __repr__(self) -> str:
        options = "" if self.norm == 2 else f", norm={self.norm}"
        if self.min_tokens is not None:
            options += f", min_tokens={self.min_tokens}"
        if self.max_tokens is not None:
            options += f", max_tokens={self.max_tokens}"
        return f"Threshold({self.threshold}{options})"


def _largest(error_norms: Tensor, count: int) -> Tensor:
    """(B, N) mask of each stream's `count` tokens of largest error."""
    index = error_norms.topk(count, dim=1, sorted=False).indices
    return torch.zeros_like(error_norms, dtype=torch.bool).scatter_(1, index, True)


def parse_policy(text: str) -> Policy:
    """A policy from its command-line form: `topk:K`, `fraction:F`, `threshold:T`, `ops:G`
    (OpsBudget, G = 1e9 multiply-accumulates per frame), `latency:MS` (LatencyBudget) or
    `cosine:C` (Fidelity(C), which a stream binds to the model's fidelity estimate)."""
    from eventful.core.budget import LatencyBudget, OpsBudget  # budget builds on this module
    from eventful.core.fidelity_policy import Fidelity  # as does the fidelity policy

    kind, _, value = text.partition(":")
    makers = {
        "topk": (TopK, int),
        "fraction": (TopFraction, float),
        "threshold": (Threshold, float),
        "ops": (OpsBudget, float),
        "latency": (LatencyBudget, float),
        "cosine": (Fidelity, float),
    }
    if kind not in makers or not value:
        raise ValueError(
            f"malformed policy {text!r}; expected topk:K, fraction:F, threshold:T, ops:G, "
            "latency:MS or cosine:C (for example topk:64, fraction:0.25, threshold:0.5, ops:1.5, "
            "latency:40, cosine:0.98)"
        )
    make, number = makers[kind]
    try:
        parsed = number(value)
    except ValueError:
        expected = "an integer" if number is int else "a number"
        raise ValueError(f"malformed policy {text!r}: {value!r} is not {expected}") from None
    return make(parsed)
