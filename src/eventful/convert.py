"""`eventful.convert`: the one call that turns a model into its eventful copy."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from eventful.core.model import EventfulViT
from eventful.core.policies import Policy
from eventful.models.vit import ViT

SUPPORTED = ("eventful.ViT",)


def convert(model: nn.Module, policy: Policy, level: str | Sequence[str] = "full") -> EventfulViT:
    """A new eventful module computing what `model` computes; `model` is left unchanged.

    level: "tokenwise", "qk" or "full" for every block, or a sequence with one per block.
    """
    if isinstance(model, ViT):
        return EventfulViT(model, policy, level)
    raise TypeError(
        f"cannot convert a {type(model).__name__}; supported models: {', '.join(SUPPORTED)}"
    )
