"""Token reductions inside an eventful step: which tokens the blocks of a group may re-process.

A `TokenReduction` (IA-RED^2's interpreters, `eventful.methods.iared2.InterpreterReduction`)
looks at the tokens before the first block of each of its groups and keeps some; from there
on, the gates of the group's blocks choose only among the kept tokens, and a token dropped
once stays dropped for the rest of the step. A dropped token is not removed: it keeps the
values the caches hold for it (from the last step that processed it), and stays a key of
attention. A fresh stream (its first step, a refresh) keeps every token.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from eventful.core.policies import Policy
from eventful.core.selection import Selection


class TokenReduction(Protocol):
    """starts: the first block of each group; `keep(group, tokens)` (B, T) bool for the tokens
    (B, T, D) before that block, prefix tokens included; `macs(group, num_tokens)`: its cost
    per stream."""

    starts: tuple[int, ...]

    def keep(self, group: int, tokens: Tensor) -> Tensor: ...

    def macs(self, group: int, num_tokens: int) -> int: ...


class Restricted(Policy):
    """`policy`'s choice among the tokens `allowed` (B, N) marks (`Policy.select_among`: a
    fraction is of the allowed tokens): the others are never selected, whatever their
    error."""

    def __init__(self, policy: Policy, allowed: Tensor) -> None:
        self.policy = policy
        self.allowed = allowed
        self.norm = policy.norm

    def select(self, error_norms: Tensor) -> Selection:
        return self.policy.select_among(error_norms, self.allowed)
