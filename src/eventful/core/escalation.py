"""Escalation: a gate selects more than its policy when too much change would go unprocessed.

A policy such as `TopFraction(0.25)` selects a fixed share of the tokens. On most frames the
change concentrates in fewer tokens than that; on some (a fade, a flash, a camera jump) it is
spread over all of them, and a fixed share leaves most of it unprocessed. `Escalation(bound,
max_tokens)` watches every gate: when a stream's unprocessed share after the policy's selection
(`eventful.core.gates`) exceeds `bound`, the gate adds that stream's unselected tokens of largest
change until the share is at most `bound`, or until the stream has `max_tokens` tokens selected
at the gate. The policy's own tokens always stay selected. A `DriftControl` carries the
settings (`escalation_bound`, `escalation_max_tokens`); `stream.ops.escalated` counts the
multiply-accumulates spent on the added tokens, which an `OpsBudget` pays back over the next
frames like any other overspend.

Added tokens make the counts differ between streams, so on CUDA an escalating gate reads them
back to the host (as `Threshold` does); whether any stream escalates is read back once per gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from eventful.core.checks import check_count, check_number
from eventful.core.policies import Policy
from eventful.core.selection import Selection


@dataclass(frozen=True)
class Escalation:
    """Select beyond the policy while a stream's unprocessed share at a gate exceeds `bound`,
    up to `max_tokens` tokens per stream and gate (None: up to every token)."""

    bound: float
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        check_number("escalation_bound", self.bound, 0, inclusive=True)
        check_count("escalation_max_tokens", self.max_tokens)

    def validate(self, num_tokens: int, policy: Policy) -> None:
        """Raise ValueError if the cap lies above the token count or below the policy's count."""
        cap = self.max_tokens
        if cap is None:
            return
        if cap > num_tokens:
            raise ValueError(
                f"escalation max_tokens={cap} exceeds the {num_tokens} tokens of this input; "
                f"expected at most {num_tokens} (or None for every token)"
            )
        own = policy.tokens_per_stream(num_tokens)
        if own is not None and cap < own:
            raise ValueError(
                f"escalation max_tokens={cap} is below the {own} tokens {policy!r} selects by "
                f"itself; expected max_tokens from {own} to {num_tokens}"
            )

    def extend(
        self, selection: Selection, l2_norms: Tensor, size: Tensor
    ) -> tuple[Selection, list[int] | None]:
        """The selection with escalated streams' extra tokens, and the extra count per stream
        (None when no stream escalates).

        l2_norms: (B, N) L2 norms of the gate's errors; size: (B,) the unprocessed share's
        denominator (N times the gate's scale)."""
        mask = selection.mask()
        left_out = l2_norms.masked_fill(mask, 0)
        unprocessed = left_out.sum(1)
        limit = self.bound * size
        over = unprocessed > limit
        if not bool(over.any()):
            return selection, None
        num_tokens = l2_norms.shape[1]
        cap = num_tokens if self.max_tokens is None else self.max_tokens
        counts = torch.tensor(selection.counts, device=l2_norms.device)
        # Unselected tokens by decreasing change; the selected ones (-1) sort last.
        ordered, order = left_out.masked_fill(mask, -1).sort(dim=1, descending=True)
        gains = ordered.clamp_min(0)
        # remaining[b, j]: what stays unprocessed before the j-th largest unselected is added.
        remaining = unprocessed.unsqueeze(1) - (gains.cumsum(1) - gains)
        needed = (remaining > limit.unsqueeze(1)).sum(1)
        extra = torch.where(over, torch.minimum(needed, (cap - counts).clamp_min(0)), 0)
        ranks = torch.arange(num_tokens, device=l2_norms.device)
        added = torch.zeros_like(mask).scatter_(1, order, ranks < extra.unsqueeze(1))
        return Selection.from_mask(mask | added), extra.tolist()
