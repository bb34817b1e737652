"""Error-bounded selection: bound the change each gate leaves unprocessed, not the token count.

A gate's *unprocessed change* for one stream is the sum, over the tokens it does not select, of
each token's error norm (its change since it was last processed): what `gates.unprocessed_change`
measures after the gate ran. `ErrorBound(bound)` selects, per stream and gate, the fewest tokens
of largest error that bring it below `bound`. A still scene costs next to nothing, a camera
pan or a scene cut as much as it needs: the count follows the change. Calibrate the bound for a
target fidelity with `eventful.calibration.calibrate_error_bound`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from eventful.core.policies import Policy, _check_norm, _is_real
from eventful.core.selection import Selection


class ErrorBound(Policy):
    """Each stream re-processes its tokens of largest error until the sum of the error norms it
    leaves unprocessed at this gate is below `bound` (in the gate input's units).

    `ErrorBound(0)` selects every token, so it equals the dense model. Counts differ between
    streams, so on CUDA building the selection reads them back to the host once per gate, as
    `Threshold` does.
    """

    def __init__(self, bound: float, norm: float = 2) -> None:
        if not _is_real(bound) or not math.isfinite(bound) or bound < 0:
            raise ValueError(f"ErrorBound expects a finite bound >= 0, got {bound!r}")
        self.bound = float(bound)
        self.norm = _check_norm(norm)

    def select(self, error_norms: Tensor) -> Selection:
        return Selection.from_mask(bounded_selection_mask(error_norms, self.bound))

    def __repr__(self) -> str:
        norm = "" if self.norm == 2 else f", norm={self.norm}"
        return f"ErrorBound({self.bound}{norm})"


def bounded_selection_mask(error_norms: Tensor, bound: float) -> Tensor:
    """(B, N) mask of each stream's fewest tokens of largest error whose complement sums to less
    than `bound`: the tokens left out are the smallest, and their error norms sum to < bound."""
    ordered, order = error_norms.sort(dim=1, descending=True)
    # left_out[b, i]: the error the stream leaves unprocessed if it selects its i largest only.
    left_out = ordered.flip(1).cumsum(1).flip(1)
    count = (left_out >= bound).sum(dim=1, keepdim=True)
    ranks = torch.arange(error_norms.shape[1], device=error_norms.device).expand_as(ordered)
    return torch.zeros_like(error_norms, dtype=torch.bool).scatter_(1, order, ranks < count)
