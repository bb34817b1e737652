"""Linear layers whose weight is packed once for the CPU's matrix library.

A plain `nn.Linear` on the CPU hands its weight to oneDNN, which re-lays it out into its
blocked format on every call. On the few rows an eventful step selects, that re-layout costs as
much as the multiply itself (BENCHMARKS.md, "roofline"). `PackedLinear` keeps the packed copy
beside the weight, made on the first call and again whenever the weight changes (its
`tensor_key`), and calls oneDNN's prepacked linear, with a following GELU fused into it. Where
that path does not apply (not the CPU, not float32, oneDNN missing, a step that records
gradients, a step being compiled by `torch.compile`, which packs weights its own way) it is
exactly `nn.Linear` followed by its activation.

On at most `SMALL_ROWS` rows, where oneDNN is several times slower than reading the weight from
memory, the layer runs the engine's own kernel (`eventful.core.kernels`) on a second copy of the
weight laid out for it, made the same way, and the activation after it; where that kernel cannot
be built, oneDNN runs every call. From `PLAIN_ROWS` rows on, the layer is `nn.Linear`'s own
call, which is faster there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful.core import kernels
from eventful.core.fingerprint import tensor_key


def _prepacked_linear_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018 (present from torch 2.1 on)
        torch.ops.mkldnn._linear_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


PREPACKED = _prepacked_linear_available()

# Up to this many rows the small-rows kernel runs: measured 2-3x faster than oneDNN's prepacked
# linear at 1 row, 1.1-1.6x at 32 and about as fast at 128, for every linear layer of ViT-S and
# ViT-B (BENCHMARKS.md, "small-rows-linear").
SMALL_ROWS = 128

# From this many rows on, PyTorch's own linear (MKL on x86) runs: at 577 rows (ViT-B/16 at 384)
# oneDNN's prepacked linear measured 0.98-1.14x its time on the layers of ViT-S and ViT-B, at
# 197 and 257 rows 0.84-1.04x (interleaved, 2 threads, AMD EPYC).
PLAIN_ROWS = 512


def _fused_activation(activation: nn.Module | None) -> tuple[str, list, str] | None:
    """oneDNN's post-op for `activation`: GELU (exact or tanh) and the identity fuse."""
    if activation is None or isinstance(activation, nn.Identity):
        return ("none", [], "")
    if type(activation) is nn.GELU:
        return ("gelu", [], activation.approximate)
    return None


class PackedLinear(nn.Linear):
    """`nn.Linear`, then `activation` (None: none), with the weight packed once for oneDNN.

    Parameters and state-dict keys are those of `nn.Linear`. x (..., in_features) ->
    (..., out_features). `activation` must be a GELU or the identity when it is fused; any other
    module runs after the linear layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = nn.Identity() if activation is None else activation
        self._post_op = _fused_activation(activation)
        self._packed: tuple[tuple, Tensor] | None = None
        self._panels: tuple[tuple, Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: nn.Module | None = None) -> PackedLinear:
        """A copy of `linear` (and of `activation`)."""
        weight = linear.weight
        packed = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            activation,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            packed.weight.copy_(weight)
            if linear.bias is not None:
                packed.bias.copy_(linear.bias)
        return packed

    def clear_weight_caches(self) -> None:
        """Forget the packed weights (`forget_weight_caches`)."""
        self._packed = None
        self._panels = None

    def __getstate__(self) -> dict:
        # The packed weights follow the weight: copies and pickles repack them.
        return {**self.__dict__, "_packed": None, "_panels": None}

    def forward(self, x: Tensor) -> Tensor:
        if not self._uses_prepacked(x):
            return self.activation(F.linear(x, self.weight, self.bias))
        rows = x.reshape(-1, self.in_features)
        small_rows = kernels.small_rows_linear() if rows.shape[0] <= SMALL_ROWS else None
        if small_rows is not None:
            out = small_rows.linear(
                rows, self._panel_weight(small_rows), self.bias, self.out_features
            )
            return self.activation(out).view(*x.shape[:-1], self.out_features)
        attr, scalars, algorithm = self._post_op
        out = torch.ops.mkldnn._linear_pointwise(
            rows, self._packed_weight(), self.bias, attr, scalars, algorithm
        )
        return out.view(*x.shape[:-1], self.out_features)

    def _uses_prepacked(self, x: Tensor) -> bool:
        return (
            PREPACKED
            and self._post_op is not None
            and x.device.type == "cpu"
            and x.dtype == torch.float32 == self.weight.dtype
            and not (torch.is_grad_enabled() and self.weight.requires_grad)
            and 0 < x.numel() < PLAIN_ROWS * self.in_features
            and not torch.compiler.is_compiling()
        )

    def _packed_weight(self) -> Tensor:
        """The weight in oneDNN's blocked layout."""
        return self._packed_copy(
            "_packed", lambda weight: torch.ops.mkldnn._reorder_linear_weight(weight, None)
        )

    def _panel_weight(self, small_rows) -> Tensor:
        """The weight in the small-rows kernel's panels."""
        return self._packed_copy("_panels", small_rows.pack)

    def _packed_copy(self, name: str, pack: Callable[[Tensor], Tensor]) -> Tensor:
        """`pack` of the weight, kept in attribute `name` until the weight changes."""
        key = tensor_key(self.weight)
        cached = getattr(self, name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, pack(self.weight.detach()))
            setattr(self, name, cached)
        return cached[1]
