"""Age-bounded references: no token's gate reference, nor what is cached from it, stays forever.

Top-k selection starves tokens whose change is steady but never among the largest: their gate
references, and the outputs and attention rows cached from them, can stay as they were for a
whole clip (letterbox padding at the first block, for instance). `MaxAge` wraps any policy and
makes every gate also select the tokens whose reference is `max_age` steps old, taking their
places out of the wrapped policy's own (so `TopK(k)` still selects k): every reference is
renewed at least that often. It is a guarantee, not a fidelity gain: on the real pans of
BENCHMARKS.md ("camera-motion") the starved tokens cost little at a fixed quarter of the tokens.

Ages are per stream, gate and token, kept in the stream's state (`StreamState.blocks`, keys
`<gate>_reference_age`), so they are saved, restored and moved with it. A stream that runs
densely (its first step, a reset, a drift-control refresh: `StreamState.fresh`) selects every
token at every gate, so its ages restart at 0; the model passes the fresh streams to
`Policy.for_block` before each block, which is where `MaxAge` learns of them. Steps run under
another policy do not age the tokens: swapping `MaxAge` back in resumes the ages it left.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from eventful.core.policies import Policy, StepReport
from eventful.core.selection import Selection

# The order in which an eventful block runs its gates (EventfulBlock.forward), each once a step.
GATES = ("qkv", "proj", "mlp")

# Score of a token due for refresh: above any error, ordered by age (oldest first).
_DUE = 1e30


class MaxAge(Policy):
    """`policy`, except that every token whose reference at a gate is `max_age` steps old (or
    older) is selected there first; with more of them than the policy's count, the oldest go
    first. Under `TopK(k)` with at most k tokens due per step, no reference is ever more than
    `max_age` steps old.
    """

    def __init__(self, policy: Policy, max_age: int) -> None:
        if not isinstance(policy, Policy) or isinstance(policy, MaxAge):
            raise ValueError(f"MaxAge wraps a policy other than MaxAge, got {policy!r}")
        if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 1:
            raise ValueError(f"MaxAge expects a positive integer max_age, got {max_age!r}")
        self.policy = policy
        self.max_age = max_age

    @property
    def norm(self) -> float:
        return self.policy.norm

    @property
    def needs_wall_time(self) -> bool:
        return self.policy.needs_wall_time

    def validate(self, num_tokens: int, blocks: nn.ModuleList | None = None) -> None:
        self.policy.validate(num_tokens, blocks)

    def tokens_per_stream(self, num_tokens: int) -> int | None:
        return self.policy.tokens_per_stream(num_tokens)

    def observe(self, report: StepReport) -> None:
        """Passed on, so that a wrapped budget controller keeps learning."""
        self.policy.observe(report)

    def select(self, error_norms: Tensor) -> Selection:
        raise RuntimeError(
            "MaxAge keeps its ages in the stream state: it selects through the view that "
            "for_block returns (the eventful model asks for one before each block)"
        )

    def for_block(self, block_state: dict[str, Tensor], fresh_streams: list[int]) -> Policy:
        for gate in GATES:
            ages = block_state.get(f"{gate}_reference_age")
            if ages is not None and fresh_streams:
                ages[fresh_streams] = 0
        return _AgedGates(self, block_state, fresh_streams)

    def __repr__(self) -> str:
        return f"MaxAge({self.policy!r}, max_age={self.max_age})"


class _AgedGates(Policy):
    """`MaxAge` serving one block for one step: its i-th `select` is the block's i-th gate."""

    def __init__(self, owner: MaxAge, block_state: dict[str, Tensor], fresh: list[int]) -> None:
        self.owner = owner
        self.block_state = block_state
        self.fresh = fresh
        self.calls = 0
        self.norm = owner.norm

    def select(self, error_norms: Tensor) -> Selection:
        if self.calls >= len(GATES):
            raise RuntimeError(f"a block ran more than {len(GATES)} gates in one step")
        ages = self._ages(GATES[self.calls], error_norms)
        self.calls += 1
        due = ages >= self.owner.max_age
        scores = torch.where(due, _DUE * (1 + ages.float() * 2.0**-10), error_norms.float())
        selection = self.owner.policy.select(scores)
        ages.add_(1).masked_fill_(selection.mask(), 0)
        if self.fresh:
            ages[self.fresh] = 0
        return selection

    def _ages(self, gate: str, error_norms: Tensor) -> Tensor:
        key = f"{gate}_reference_age"
        ages = self.block_state.get(key)
        if ages is None or ages.shape != error_norms.shape or ages.device != error_norms.device:
            ages = torch.zeros(error_norms.shape, dtype=torch.int32, device=error_norms.device)
            self.block_state[key] = ages
        return ages
