"""IA-RED^2 (Pan et al., NeurIPS 2021): learned, interpretable dropping of redundant patches.

The blocks are split into groups (by default 3 groups of 4 for 12 blocks). Before each group an
`Interpreter` scores every patch token still in the sequence with a keep probability; a
`KeepRule` turns the probabilities into decisions. A dropped token leaves the sequence: the
blocks after it run on shorter tensors, so time falls with the ops. A dropped token stays
dropped; prefix tokens (class token, registers) are always kept.

Heads that need every patch (a saliency decoder, a detector's feature map) get, for a dropped
token, its features from where it was dropped, passed through the final norm with the others.

The backbone runs from its `EncoderDescription` (the same one the eventful engine runs), so
every family with global attention is supported; windows and relative position biases are
not, since a dropped token would leave holes in a window or a position table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful.convert import (
    EncoderAdapter,
    adapt_encoder,
    convert,
    find_encoder,
    is_encoder,
    replace_encoder,
)
from eventful.core.description import BlockDescription, EncoderDescription
from eventful.core.fingerprint import model_fingerprint
from eventful.core.kv_pooling import pool_keys_values
from eventful.core.model import EventfulModule
from eventful.core.ops import dense_block_macs, linear_macs
from eventful.core.policies import Policy


class Interpreter(nn.Module):
    """Keep probabilities (B, n) of the patch tokens of x (B, P + n, D), P prefix tokens.

    Per head, a query (the class token's, projected; or a learned one for models without a
    class token) meets each token's projected key; the logit is squashed by a sigmoid and the
    heads' probabilities are averaged. Each head's bias starts at `initial_logit`, so an
    untrained interpreter keeps nearly every token.
    """

    def __init__(
        self,
        dim: int,
        class_token: bool,
        heads: int = 4,
        head_dim: int = 32,
        initial_logit: float = 3.0,
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(dim)
        self.keys = nn.Linear(dim, heads * head_dim)
        self.query = nn.Linear(dim, heads * head_dim) if class_token else None
        self.learned_query = None if class_token else nn.Parameter(torch.randn(heads, head_dim))
        self.bias = nn.Parameter(torch.full((heads,), float(initial_logit)))

    def forward(self, x: Tensor, prefix: int) -> Tensor:
        batch, tokens, _ = x.shape
        normed = self.norm(x)
        keys = self.keys(normed[:, prefix:]).view(batch, tokens - prefix, self.heads, self.head_dim)
        if self.query is not None:
            query = self.query(normed[:, 0]).view(batch, self.heads, self.head_dim)
        else:
            query = self.learned_query.expand(batch, -1, -1)
        logits = torch.einsum("bnhd,bhd->bnh", keys, query) / math.sqrt(self.head_dim)
        return torch.sigmoid(logits + self.bias).mean(dim=-1)

    def macs(self, patches: int) -> int:
        """Multiply-accumulates for `patches` patch tokens (the core's conventions)."""
        query = 0 if self.query is None else linear_macs(1, self.query)
        return linear_macs(patches, self.keys) + query + patches * self.heads * self.head_dim


@dataclass(frozen=True)
class KeepRule:
    """Which scored tokens a group keeps: those with a keep probability of at least
    `threshold`, and of those at most the `max_tokens` most probable (None: no limit)."""

    threshold: float = 0.5
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold!r}")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 0
        ):
            raise ValueError(
                f"max_tokens must be a non-negative integer or None, got {self.max_tokens!r}"
            )

    def __call__(self, probabilities: Tensor, present: Tensor) -> Tensor:
        """Keep decisions (B, N) for probabilities (B, N) of the tokens `present` (B, N)."""
        keep = present & (probabilities >= self.threshold)
        if self.max_tokens is not None and self.max_tokens < keep.shape[1]:
            ranked = torch.where(keep, probabilities, -1.0)
            top = ranked.topk(self.max_tokens, dim=1).indices
            keep = keep & torch.zeros_like(keep).scatter_(1, top, True)
        return keep


# decide(group, probabilities (B, N), present (B, N)) -> keep (B, N), over the patch tokens in
# their original order (absent tokens: probability 0, not present): a KeepRule at inference,
# sampling in training.
Decide = Callable[[int, Tensor, Tensor], Tensor]


@dataclass
class DropResult:
    """One forward pass of `IARed2`.

    tokens (B, P + N, D): final-norm output in the original token order, a dropped token's
    features taken from where it was dropped; probabilities, per group: (B, N) keep
    probabilities of the tokens scored there (0 where a token was already dropped); kept, per
    group: (B, N) which tokens the group kept; macs (B,): multiply-accumulates per stream.
    """

    tokens: Tensor
    probabilities: list[Tensor] = field(default_factory=list)
    kept: list[Tensor] = field(default_factory=list)
    macs: list[int] = field(default_factory=list)


def equal_groups(depth: int, groups: int) -> tuple[int, ...]:
    """The first block of each of `groups` groups of equal size."""
    if groups < 1 or depth % groups != 0:
        raise ValueError(f"cannot split {depth} blocks into {groups} equal groups")
    return tuple(range(0, depth, depth // groups))


class IARed2(nn.Module):
    """An encoder description run densely, with an interpreter before each group of blocks.

    groups: how many groups of equal size, or the first block of each group, beginning with 0.
    The description's modules are shared, not copied, and never modified; only the
    interpreters are trained.
    """

    def __init__(
        self,
        description: EncoderDescription,
        groups: int | Sequence[int] = 3,
        class_token: bool = True,
        interpreter_heads: int = 4,
        interpreter_dim: int = 32,
    ) -> None:
        super().__init__()
        description.validate()
        partitioned = description.partitioned_blocks
        if partitioned:
            raise ValueError(
                f"IA-RED^2 drops tokens from global attention; block {partitioned[0]} attends "
                "within windows or with a relative position bias, which dropped tokens would break"
            )
        depth = len(description.blocks)
        starts = equal_groups(depth, groups) if isinstance(groups, int) else tuple(groups)
        if (
            not starts
            or starts[0] != 0
            or list(starts) != sorted(set(starts))
            or starts[-1] >= depth
        ):
            raise ValueError(
                f"group starts must begin at block 0 and rise strictly below {depth}, got {starts}"
            )
        self.embedding = description.embedding
        self.blocks = description.blocks
        self.norm = description.norm
        self.starts = starts
        self.class_token = class_token
        dim = description.blocks[0].dim
        with torch.random.fork_rng(devices=[]):  # the same interpreters on every build
            torch.manual_seed(0)
            self.interpreters = nn.ModuleList(
                Interpreter(dim, class_token, interpreter_heads, interpreter_dim) for _ in starts
            )

    @property
    def settings(self) -> dict:
        """What a checkpoint must match besides the weights."""
        first = self.interpreters[0]
        return {
            "starts": list(self.starts),
            "class_token": self.class_token,
            "interpreter_heads": first.heads,
            "interpreter_dim": first.head_dim,
        }

    def forward(self, frames: Tensor, decide: Decide | KeepRule | None = None) -> DropResult:
        """Run on frames (B, C, H, W); `decide` (default `KeepRule()`) makes each group's keep
        decisions, from its probabilities and the tokens still present."""
        rule = KeepRule() if decide is None else decide
        if isinstance(rule, KeepRule):
            keep_rule = rule

            def decide_with_rule(group: int, probabilities: Tensor, present: Tensor) -> Tensor:
                return keep_rule(probabilities, present)

            rule = decide_with_rule
        with torch.no_grad():  # the backbone is frozen: only the interpreters learn
            x = self.embedding(frames)
        batch, total, dim = x.shape
        prefix = self.embedding.num_prefix_tokens
        patches = total - prefix
        at_drop = x.new_zeros(batch, patches, dim)  # each patch's features where it left
        ids = torch.arange(patches, device=x.device).expand(batch, patches)
        present = torch.ones(batch, patches, dtype=torch.bool, device=x.device)
        result = DropResult(tokens=x, macs=[0] * batch)
        ends = (*self.starts[1:], len(self.blocks))
        for group, (start, end) in enumerate(zip(self.starts, ends, strict=True)):
            interpreter = self.interpreters[group]
            probabilities = _by_id(interpreter(x, prefix), ids, present, patches)
            present_by_id = _by_id(present, ids, present, patches)
            keep_by_id = rule(group, probabilities, present_by_id) & present_by_id
            result.probabilities.append(probabilities)
            result.kept.append(keep_by_id)
            keep = keep_by_id.gather(1, ids) & present
            counts = present.sum(dim=1).tolist()
            with torch.no_grad():
                _write_by_id(at_drop, x[:, prefix:], ids, present & ~keep)
                x, ids, present = _compact(x, ids, keep, prefix)
            kept_counts = present.sum(dim=1).tolist()
            for stream in range(batch):
                result.macs[stream] += interpreter.macs(counts[stream])
                for block in self.blocks[start:end]:
                    result.macs[stream] += block_macs(block, prefix + kept_counts[stream])
            with torch.no_grad():
                mask = _attention_mask(present, prefix)
                for block in self.blocks[start:end]:
                    x = dense_block(block, x, mask)
        with torch.no_grad():
            _write_by_id(at_drop, x[:, prefix:], ids, present)
            result.tokens = self.norm(torch.cat([x[:, :prefix], at_drop], dim=1))
        return result

    @torch.no_grad()
    def dense(self, frames: Tensor) -> Tensor:
        """The encoder's final tokens (B, T, D) with every token and no interpreter."""
        x = self.embedding(frames)
        for block in self.blocks:
            x = dense_block(block, x)
        return self.norm(x)

    def dense_macs(self, frames: Tensor) -> int:
        """Multiply-accumulates of one stream of the blocks with every token (no interpreter)."""
        tokens = self.embedding.num_tokens(*frames.shape[-2:])
        return sum(block_macs(block, tokens) for block in self.blocks)


def block_macs(block: BlockDescription, tokens: int) -> int:
    """Multiply-accumulates of one stream of a described block on `tokens` tokens, every
    category together (`ops.dense_block_macs`)."""
    return sum(dense_block_macs(block, tokens).values())


def dense_block(
    block: BlockDescription,
    x: Tensor,
    mask: Tensor | None = None,
    pool: tuple[tuple[int, int], int] | None = None,
) -> Tensor:
    """The described block run densely on x (B, n, D); `mask` (B, 1, n, n) bool, if given,
    says which keys each query attends to; `pool` (grid, factor), if given, averages the
    patches' keys and values over the grid's cells (`eventful.core.kv_pooling`)."""
    batch, tokens, dim = x.shape
    heads = block.attention.heads
    qkv = block.qkv(block.norm1(x)).view(batch, tokens, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if pool is not None:
        k, v = pool_keys_values(k, v, *pool)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=block.attention.scale)
    attended = block.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
    if block.layer_scale1 is not None:
        attended = attended * block.layer_scale1
    y = x + attended
    mlp = block.fc2(block.activation(block.fc1(block.norm2(y))))
    if block.layer_scale2 is not None:
        mlp = mlp * block.layer_scale2
    return y + mlp


def _by_id(values: Tensor, ids: Tensor, where: Tensor, patches: int) -> Tensor:
    """(B, n) values of the tokens `ids` (B, n) -> (B, patches) in token order; zero (False)
    where no present token holds the id."""
    out = values.new_zeros(values.shape[0], patches)
    _write_by_id(out.unsqueeze(-1), values.unsqueeze(-1), ids, where)
    return out


def _write_by_id(target: Tensor, values: Tensor, ids: Tensor, where: Tensor) -> None:
    """target (B, N, X) takes the rows of values (B, n, X) at their token ids (B, n), where
    `where` (B, n)."""
    batch = target.shape[0]
    stream = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(ids)
    target[stream[where], ids[where]] = values[where].to(target.dtype)


def _compact(x: Tensor, ids: Tensor, keep: Tensor, prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """The prefix and the kept patch tokens of each stream, in order, padded to the batch's
    largest count: tokens (B, P + n', D), their ids and which entries are real (B, n')."""
    counts = keep.sum(dim=1)
    width = int(counts.max())
    order = keep.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :width]
    patches = x[:, prefix:].gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    present = torch.arange(width, device=x.device) < counts.unsqueeze(1)
    return torch.cat([x[:, :prefix], patches], dim=1), ids.gather(1, order), present


def _attention_mask(present: Tensor, prefix: int) -> Tensor | None:
    """None when every entry is real; else (B, 1, n, n): every query attends to the real
    tokens, and a padding entry to itself as well, so that its row stays finite."""
    if bool(present.all()):
        return None
    batch = present.shape[0]
    real = torch.cat([present.new_ones(batch, prefix), present], dim=1)
    itself = torch.eye(real.shape[1], dtype=torch.bool, device=real.device)
    return (real[:, None, :] | itself).unsqueeze(1)


class DroppingEncoderCall(nn.Module):
    """Stands in for a model's encoder: pixel values -> what the encoder returns, computed by
    `IARed2` with the keep rule of the current call; keeps the last `DropResult`."""

    def __init__(self, dropping: IARed2, adapter: EncoderAdapter, fingerprint: str) -> None:
        super().__init__()
        self.dropping = dropping
        self.fingerprint = fingerprint
        self.format_output = adapter.format_output
        self.check_arguments = adapter.check_arguments
        self.rule: Decide | KeepRule | None = None
        self.last: DropResult | None = None

    def forward(self, pixel_values: Tensor | None = None, **options) -> object:
        if pixel_values is None:
            pixel_values = options.pop("pixel_values", None)
        self.check_arguments(options)
        self.last = self.dropping(pixel_values, self.rule)
        return self.format_output(self.last.tokens, pixel_values)


class IARed2Model(nn.Module):
    """A model (an encoder of a supported family, or a model that calls one) whose encoder
    drops patches the IA-RED^2 way; `model(frames, rule)` returns what the model returns, and
    `last` the encoder's `DropResult`. The model's weights are shared, not copied.

    groups: how many equal groups of blocks, each with an interpreter before it, or the first
    block of each group.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: int | Sequence[int] = 3,
        interpreter_heads: int = 4,
        interpreter_dim: int = 32,
    ) -> None:
        super().__init__()

        def dropping_call(encoder: nn.Module) -> DroppingEncoderCall:
            adapter = adapt_encoder(encoder)
            if adapter.taps:
                raise ValueError("IA-RED^2 does not support encoders with multi-scale outputs")
            class_token = getattr(adapter.description.embedding, "class_token", None) is not None
            dropping = IARed2(
                adapter.description, groups, class_token, interpreter_heads, interpreter_dim
            )
            return DroppingEncoderCall(dropping, adapter, model_fingerprint(encoder))

        if is_encoder(model):
            self.wrapped, self.path = dropping_call(model), ""
        else:
            self.wrapped, self.path = replace_encoder(model, dropping_call)

    @property
    def call(self) -> DroppingEncoderCall:
        return self.wrapped.get_submodule(self.path)

    @property
    def dropping(self) -> IARed2:
        return self.call.dropping

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the encoder's weights, which a checkpoint must match."""
        return self.call.fingerprint

    @property
    def interpreters(self) -> nn.ModuleList:
        return self.call.dropping.interpreters

    @property
    def last(self) -> DropResult | None:
        return self.call.last

    def forward(self, frames: Tensor, rule: Decide | KeepRule | None = None) -> object:
        self.call.rule = rule
        return self.wrapped(frames)


class InterpreterReduction:
    """IA-RED^2's interpreters as a token reduction of an eventful step
    (`eventful.core.reduction`): before each group's first block, the interpreter rates the
    tokens as the eventful step has them and `rule` keeps some; the group's gates then choose
    among those. `last` holds the latest keep probabilities per group (B, N patches)."""

    def __init__(self, model: IARed2Model, rule: KeepRule) -> None:
        self.model = model
        self.rule = rule
        self.starts = model.dropping.starts
        self.prefix = model.dropping.embedding.num_prefix_tokens
        self.last: list[Tensor] = []

    def keep(self, group: int, tokens: Tensor) -> Tensor:
        if group == 0:
            self.last = []
        probabilities = self.model.interpreters[group](tokens, self.prefix)
        self.last.append(probabilities)
        kept = self.rule(probabilities, torch.ones_like(probabilities, dtype=torch.bool))
        return torch.cat([kept.new_ones(kept.shape[0], self.prefix), kept], dim=1)

    def macs(self, group: int, num_tokens: int) -> int:
        return self.model.interpreters[group].macs(num_tokens - self.prefix)


def convert_with_interpreters(
    model: nn.Module,
    iared2: IARed2Model,
    policy: Policy,
    level: str = "exact",
    rule: KeepRule | None = None,
) -> EventfulModule:
    """`eventful.convert(model, policy, level)` whose gates also skip the patches that the
    trained interpreters of `iared2` (built on `model`) drop in each frame: temporal gating and
    spatial dropping together. A dropped patch keeps its cached values and stays a key of
    attention (`eventful.core.reduction`)."""
    encoder = model if is_encoder(model) else find_encoder(model)[1]
    if model_fingerprint(encoder) != iared2.fingerprint:
        raise ValueError(
            "the IA-RED^2 interpreters were built for another backbone (fingerprint "
            f"{iared2.fingerprint}); this model's encoder has {model_fingerprint(encoder)}"
        )
    converted = convert(model, policy, level)
    converted.encoder.reduction = InterpreterReduction(iared2, rule or KeepRule())
    return converted
