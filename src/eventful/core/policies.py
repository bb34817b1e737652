"""Policies: map per-token error norms (B, N) to the tokens each stream re-processes.

A policy is stateless and may be swapped between steps without resetting a stream.
"""

from __future__ import annotations

import math

from torch import Tensor

from eventful.core.selection import Selection

_NORMS = (1, 2, math.inf)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_norm(norm: float) -> float:
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of 1, 2 or math.inf, got {norm!r}")
    return norm


class Policy:
    """Base class. `norm` is the order of the per-token vector norm of the gate error."""

    norm: float = 2

    def validate(self, num_tokens: int) -> None:
        """Raise ValueError if the policy cannot run on inputs of `num_tokens` tokens."""

    def select(self, error_norms: Tensor) -> Selection:
        raise NotImplementedError


class TopK(Policy):
    """Each stream re-processes its k tokens of largest error. Static shapes; no sync."""

    def __init__(self, k: int, norm: float = 2) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TopK expects a positive integer k, got {k!r}")
        self.k = k
        self.norm = _check_norm(norm)

    def validate(self, num_tokens: int) -> None:
        if self.k > num_tokens:
            raise ValueError(
                f"TopK(k={self.k}) exceeds the {num_tokens} tokens of this input; "
                f"expected 1 <= k <= {num_tokens}"
            )

    def select(self, error_norms: Tensor) -> Selection:
        index = error_norms.topk(self.k, dim=1, sorted=False).indices
        return Selection.from_indices(index, error_norms.shape[1])

    def __repr__(self) -> str:
        return f"TopK({self.k})"


class TopFraction(Policy):
    """Each stream re-processes round(fraction * N) tokens (at least one) of largest error."""

    def __init__(self, fraction: float, norm: float = 2) -> None:
        if not _is_real(fraction) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"TopFraction expects a fraction in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)
        self.norm = _check_norm(norm)

    def count(self, num_tokens: int) -> int:
        return max(1, round(self.fraction * num_tokens))

    def select(self, error_norms: Tensor) -> Selection:
        k = self.count(error_norms.shape[1])
        index = error_norms.topk(k, dim=1, sorted=False).indices
        return Selection.from_indices(index, error_norms.shape[1])

    def __repr__(self) -> str:
        return f"TopFraction({self.fraction})"


class Threshold(Policy):
    """Each stream re-processes the tokens whose error norm is at least `threshold`.

    Counts differ between streams. `Threshold(0)` selects every token. The per-stream counts
    size the work, so on CUDA building the selection reads them back to the host once per gate;
    on the CPU nothing waits.
    """

    def __init__(self, threshold: float, norm: float = 2) -> None:
        if not _is_real(threshold) or not threshold >= 0.0:
            raise ValueError(f"Threshold expects a threshold >= 0, got {threshold!r}")
        self.threshold = float(threshold)
        self.norm = _check_norm(norm)

    def select(self, error_norms: Tensor) -> Selection:
        return Selection.from_mask(error_norms >= self.threshold)

    def __repr__(self) -> str:
        norm = "" if self.norm == 2 else f", norm={self.norm}"
        return f"Threshold({self.threshold}{norm})"


def parse_policy(text: str) -> Policy:
    """A policy from its command-line form: `topk:K`, `fraction:F` or `threshold:T`."""
    kind, _, value = text.partition(":")
    makers = {
        "topk": (TopK, int),
        "fraction": (TopFraction, float),
        "threshold": (Threshold, float),
    }
    if kind not in makers or not value:
        raise ValueError(
            f"malformed policy {text!r}; expected topk:K, fraction:F or threshold:T "
            "(for example topk:64, fraction:0.25, threshold:0.5)"
        )
    make, number = makers[kind]
    try:
        parsed = number(value)
    except ValueError:
        expected = "an integer" if number is int else "a number"
        raise ValueError(f"malformed policy {text!r}: {value!r} is not {expected}") from None
    return make(parsed)
