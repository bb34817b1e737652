"""A policy that spends what the content needs: `Fidelity(target)`.

A stream estimates its cosine to the dense model from what its gates leave unprocessed
(`eventful.core.estimate`): 1 - a u^p, with u the mean over the gates of each gate's
unprocessed share (`eventful.core.gates`). Inverting the map gives the share a gate may leave
for the estimate to stay at or above the target, u* = ((1 - target) / a)^(1 / p); each gate
then selects, per stream, its fewest tokens of largest change that leave at most u* of its
input's size unprocessed. So every gate's share, and their mean, stays within u*, and the
estimate at or above the target, unless the cap binds. A still camera selects next to nothing,
a pan or a cut as much as it needs. A floor (a share of the tokens that every gate selects
whatever the estimate) and a cap (the share it never exceeds) keep the count sane; drift
control still refreshes on cuts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from eventful.core.estimate import FidelityEstimate
from eventful.core.policies import Policy, _is_real
from eventful.core.selection import Selection

CALIBRATE = (
    "calibrate one on your own frames with eventful.calibration.calibrate_fidelity_estimate "
    "(benchmarks/calibrate_estimate.py does it for the zoo's saliency model)"
)


def _check_share(name: str, value: object, low_open: bool) -> float:
    ok = _is_real(value) and math.isfinite(value) and 0 <= value <= 1
    if not ok or (low_open and value == 0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"Fidelity expects {name} in {interval}, got {value!r}")
    return float(value)


class Fidelity(Policy):
    """Each gate selects, per stream, its fewest tokens of largest change that keep the
    stream's estimated cosine to the dense model at or above `target`, in (0, 1].

    `estimate`: the model's `FidelityEstimate` (a converted zoo model's shipped one, or one of
    your own); a stream given an estimate binds it to a policy that has none. `floor` and `cap`:
    the least and the most tokens each gate selects per stream, as shares of the tokens (at
    least one token). Target 1 selects every token that changed at all. Counts differ between
    streams, so on CUDA each gate reads them back to the host, as `Threshold` does.
    """

    needs_gate_size = True

    def __init__(
        self,
        target: float,
        estimate: FidelityEstimate | None = None,
        floor: float = 0.02,
        cap: float = 1.0,
    ) -> None:
        self.target = _check_share("a target", target, low_open=True)
        self.floor = _check_share("floor", floor, low_open=False)
        self.cap = _check_share("cap", cap, low_open=True)
        if self.floor > self.cap:
            raise ValueError(f"Fidelity expects floor <= cap, got floor={floor!r}, cap={cap!r}")
        if estimate is not None and not isinstance(estimate, FidelityEstimate):
            raise TypeError(f"Fidelity expects a FidelityEstimate or None, got {estimate!r}")
        self.estimate = estimate

    def share_bound(self) -> float:
        """u*: the unprocessed share each gate may leave (0 at target 1)."""
        if self.estimate is None:
            raise ValueError(f"{self!r} has no fidelity estimate to invert: {CALIBRATE}")
        if self.target >= 1:
            return 0.0
        coefficient, exponent = self.estimate.coefficient, self.estimate.exponent
        return ((1 - self.target) / coefficient) ** (1 / exponent)

    def validate(self, num_tokens: int, blocks: nn.ModuleList | None = None) -> None:
        self.share_bound()  # refuses a policy without an estimate before any cache is touched

    def select(self, error_norms: Tensor) -> Selection:
        raise ValueError(
            f"{self!r} selects within each gate's size (select_within_size); it cannot serve "
            "where a gate's size is unknown (a token reduction)"
        )

    def select_within_size(self, error_norms: Tensor, size: Tensor) -> Selection:
        """Per stream, the fewest tokens of largest error (B, N) whose complement sums to at
        most u* times `size` (B,), within the floor and the cap."""
        num_tokens = error_norms.shape[1]
        bound = (self.share_bound() * size).unsqueeze(1)
        ordered, order = error_norms.sort(dim=1, descending=True)
        # left_out[b, i]: the error stream b leaves unprocessed if it selects its i largest only.
        left_out = ordered.flip(1).cumsum(1).flip(1)
        counts = (left_out > bound).sum(dim=1, keepdim=True)
        counts = counts.clamp(
            self._tokens(self.floor, num_tokens), self._tokens(self.cap, num_tokens)
        )
        ranks = torch.arange(num_tokens, device=error_norms.device).expand_as(ordered)
        mask = torch.zeros_like(error_norms, dtype=torch.bool).scatter_(1, order, ranks < counts)
        return Selection.from_mask(mask)

    @staticmethod
    def _tokens(share: float, num_tokens: int) -> int:
        return min(num_tokens, max(1, round(share * num_tokens)))

    def bound_to(self, estimate: FidelityEstimate) -> Fidelity:
        """The same policy reading `estimate`."""
        return Fidelity(self.target, estimate, self.floor, self.cap)

    def __repr__(self) -> str:
        bounds = (
            "" if (self.floor, self.cap) == (0.02, 1.0) else f", floor={self.floor}, cap={self.cap}"
        )
        return f"Fidelity({self.target}{bounds})"
