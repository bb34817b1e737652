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
call, which is faster there. At precision "bf16", where the CPU has AMX tiles, a third copy laid
out for the engine's tiles kernel serves the rows between `TILES_MIN_ROWS` and
`TILES_MAX_ROWS`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful.core import kernels
from eventful.core.fingerprint import tensor_key
from eventful.core.precision import quantized


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

# Whether oneDNN multiplies bfloat16 on this CPU (AVX-512 with BW, VL and DQ, or AVX-NE-CONVERT);
# elsewhere the bfloat16 layers above `BF16_SMALL_ROWS` rows run PyTorch's own linear.
PREPACKED_BF16 = PREPACKED and torch.ops.mkldnn._is_mkldnn_bf16_supported()

# Up to this many rows the small-rows kernel runs: measured 2-3x faster than oneDNN's prepacked
# linear at 1 row, 1.1-1.6x at 32, and from 128 to 384 rows as fast (ViT-B's and ViT-L's
# layers) or up to 1.4x faster (ViT-Ti's and ViT-S's), float32 and int8 weights (weights from
# memory, interleaved, Intel Xeon with AVX-512, 2 threads; BENCHMARKS.md, "small-rows-linear").
SMALL_ROWS = 384

# At precision "bf16" (and a float32 layer under `compute_dtype(torch.bfloat16)`), up to this
# many rows the small-rows kernel multiplies bfloat16 pairs, and above oneDNN's prepacked
# bfloat16 linear (AMX or AVX512-BF16): interleaved over ViT-S's 48 layers (Intel Xeon with
# AMX, 2 threads), ours took 0.62x oneDNN's time at 4 rows, 0.84x at 12, 1.03x at 16, 1.29x at
# 24.
BF16_SMALL_ROWS = 16

# At precision "bf16", where the CPU has AMX tiles, rows from `TILES_MIN_ROWS` to
# `TILES_MAX_ROWS` run the tiles kernel (`kernels.tiles_linear`) instead: interleaved over whole
# steps (2 threads, Intel Xeon with AMX) it took 1.04x the small-rows kernel's time at 4 rows
# and 0.83x at 16 (ViT-S/14), 0.89-0.95x oneDNN's at 64 (ViT-S/14), 0.99x at 36 and 1.04x at
# 144 (ViT-B/16 @ 384).
TILES_MIN_ROWS = 9
TILES_MAX_ROWS = 128

# From this many rows on, PyTorch's own linear (MKL on x86) runs: at 577 rows (ViT-B/16 at 384)
# oneDNN's prepacked linear measured 0.98-1.14x its time on the layers of ViT-S and ViT-B, at
# 197 and 257 rows 0.84-1.04x (interleaved, 2 threads, AMD EPYC).
PLAIN_ROWS = 512


_NO_ACTIVATION = ("none", [], "")
_EXACT_GELU = ("gelu", [], "none")


def _fused_activation(activation: nn.Module | None) -> tuple[str, list, str] | None:
    """oneDNN's post-op for `activation`: GELU (exact or tanh) and the identity fuse."""
    if activation is None or isinstance(activation, nn.Identity):
        return _NO_ACTIVATION
    if type(activation) is nn.GELU:
        return ("gelu", [], activation.approximate)
    return None


class StepOperands(NamedTuple):
    """What a kernel call of `PackedLinear.step_operands` needs: the weight as the kernel takes
    it (the small-rows kernel's panels, 3-D, or in bfloat16 pairs 4-D; the tiles kernel's, 4-D
    int32; oneDNN's prepacked bfloat16 weight, 2-D), the bias (bfloat16 for oneDNN's), the int8
    panels' scale, and the activation inside the call ("none" or "gelu", the exact GELU)."""

    weight: Tensor
    bias: Tensor | None
    scale: Tensor | None
    activation: str


class PackedLinear(nn.Linear):
    """`nn.Linear`, then `activation` (None: none), with the weight packed once for oneDNN.

    Parameters and state-dict keys are those of `nn.Linear`. x (..., in_features) ->
    (..., out_features). `activation` must be a GELU or the identity when it is fused; any other
    module runs after the linear layer.

    `precision` (`eventful.core.precision`): "fp32", "bf16" or "int8". The parameters stay
    the float32 weights they were given; the layer multiplies by their rounding to the
    precision (`precision.quantized`), kept beside them and remade whenever the weight changes,
    on every path alike. Input and output keep the input's dtype. Inside
    `compute_dtype(dtype)` (how a converted model runs under `torch.autocast`), a float32 layer
    multiplies in `dtype` instead.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        if precision not in LAYER_PRECISIONS:
            raise ValueError(f"precision must be one of {LAYER_PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.activation = nn.Identity() if activation is None else activation
        self._post_op = _fused_activation(activation)
        self._packed: tuple[tuple, Tensor] | None = None
        self._panels: tuple[tuple, Tensor] | None = None
        self._rounded: tuple[tuple, Tensor] | None = None
        self._bias_bf16: tuple[tuple, Tensor] | None = None
        self._tiles: tuple[tuple, Tensor] | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, activation: nn.Module | None = None, precision: str = "fp32"
    ) -> PackedLinear:
        """A copy of `linear` (and of `activation`) at `precision`."""
        weight = linear.weight
        packed = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            activation,
            device=weight.device,
            dtype=weight.dtype,
            precision=precision,
        )
        with torch.no_grad():
            packed.weight.copy_(weight)
            if linear.bias is not None:
                packed.bias.copy_(linear.bias)
        return packed

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, precision={self.precision}"

    def clear_weight_caches(self) -> None:
        """Forget the packed weights (`forget_weight_caches`)."""
        self._packed = None
        self._panels = None
        self._rounded = None
        self._bias_bf16 = None
        self._tiles = None

    def __getstate__(self) -> dict:
        # The packed weights follow the weight: copies and pickles repack them.
        caches = {
            "_packed": None,
            "_panels": None,
            "_rounded": None,
            "_bias_bf16": None,
            "_tiles": None,
        }
        return {**self.__dict__, **caches}

    def __setstate__(self, state: dict) -> None:
        # Layers pickled before precisions existed are float32 ones.
        state.setdefault("precision", "fp32")
        state.setdefault("_rounded", None)
        state.setdefault("_bias_bf16", None)
        state.setdefault("_tiles", None)
        super().__setstate__(state)

    def forward(self, x: Tensor) -> Tensor:
        low = self._low_precision_dtype(x)
        if low is not None:
            return self._low_precision_forward(x, low)
        if not self._uses_prepacked(x):
            return self.activation(F.linear(x, self._float_weight(x), self.bias))
        rows = x.reshape(-1, self.in_features)
        small_rows = kernels.small_rows_linear() if rows.shape[0] <= SMALL_ROWS else None
        if small_rows is not None:
            panels, scale = self._panel_weight(small_rows)
            return self._small_rows(small_rows, rows, panels, scale).view(
                *x.shape[:-1], self.out_features
            )
        attr, scalars, algorithm = self._post_op
        out = torch.ops.mkldnn._linear_pointwise(
            rows, self._packed_weight(), self.bias, attr, scalars, algorithm
        )
        return out.view(*x.shape[:-1], self.out_features)

    def rows_forward(self, rows: Tensor) -> Tensor:
        """`forward` of float32 rows (M, in) on the CPU outside autograd, as a block's lean step
        has them: where `forward` takes the small-rows kernel, straight to it, without
        `forward`'s checks."""
        if (
            rows.shape[0] <= SMALL_ROWS
            and PREPACKED
            and self._post_op is not None
            and self.weight.dtype == torch.float32
            and self._low_precision_dtype(rows) is None
        ):
            kernel = kernels.small_rows_linear()
            if kernel is not None:
                panels, scale = self._panel_weight(kernel)
                return self._small_rows(kernel, rows, panels, scale)
        return self(rows)

    def step_operands(self, rows: int) -> StepOperands | None:
        """Where `rows_forward` of that many float32 rows is one kernel call with the activation
        inside it (none, or the exact GELU): the small-rows kernel, or at precision "bf16" the
        tiles kernel, or above `BF16_SMALL_ROWS` rows oneDNN's prepacked bfloat16 linear; its
        operands, for a caller that runs the kernel itself (a block's step in one call,
        `EventfulBlock._block_step_weights`); else None."""
        if self._post_op == _NO_ACTIVATION:
            activation = "none"
        elif self._post_op == _EXACT_GELU:
            activation = "gelu"
        else:
            return None
        if not PREPACKED or self.weight.dtype != torch.float32 or rows < 1:
            return None
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return None
        kernel = kernels.small_rows_linear()
        if kernel is None or torch.compiler.is_compiling():
            return None
        low = self._low_precision_dtype_of(torch.float32)
        if low is None and rows <= SMALL_ROWS:
            panels, scale = self._panel_weight(kernel)
            return StepOperands(panels, self.bias, scale, activation)
        tiles = _tiles_for(rows)
        if low == torch.bfloat16 and tiles is not None:
            return StepOperands(self._tiles_panels(tiles), self.bias, None, activation)
        if low == torch.bfloat16 and rows <= BF16_SMALL_ROWS:
            return StepOperands(self._bfloat16_panels(kernel), self.bias, None, activation)
        if low == torch.bfloat16 and PREPACKED_BF16:
            bias = None if self.bias is None else self._bfloat16_bias()
            return StepOperands(self._prepacked_bfloat16_weight(), bias, None, activation)
        return None

    def _low_precision_dtype(self, x: Tensor) -> torch.dtype | None:
        """The dtype a call on x multiplies in where it is not x's (`_low_precision_dtype_of`)."""
        return self._low_precision_dtype_of(x.dtype)

    def _low_precision_dtype_of(self, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype a call on an input of `dtype` multiplies in where it is not `dtype`:
        bfloat16 at precision "bf16", the `compute_dtype` for a float32 layer, else None."""
        if self.precision == "bf16":
            wanted = torch.bfloat16
        elif self.precision == "fp32":
            wanted = current_compute_dtype()
        else:
            return None
        return None if wanted is None or wanted == dtype else wanted

    def _low_precision_forward(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """x times the weight in `dtype`, back in x's dtype; the bias and the activation there.
        Float32 rows on the CPU multiply in bfloat16 on the small-rows kernel or oneDNN's
        prepacked linear (`_bfloat16_forward`)."""
        if dtype == torch.bfloat16 and self._uses_prepacked(x, plain_rows=False):
            return self._bfloat16_forward(x)
        weight = self._cached("_rounded", lambda w: w.to(dtype), dtype)
        out = F.linear(x.to(dtype), weight).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return self.activation(out)

    def _bfloat16_forward(self, x: Tensor) -> Tensor:
        """Float32 rows x (..., in) on the CPU times the weight rounded to bfloat16, the sums in
        float32: where the CPU has AMX tiles, from `TILES_MIN_ROWS` to `TILES_MAX_ROWS` rows on
        the tiles kernel (`kernels.tiles_linear`), the bias and the activation in float32 and a
        float32 output; else up to `BF16_SMALL_ROWS` rows on the small-rows kernel, the bias and
        the activation in float32, and above oneDNN's prepacked bfloat16 linear with the bias
        and the activation in it, whose output is rounded to bfloat16 (as in a model cast to
        bfloat16)."""
        rows = x.reshape(-1, self.in_features)
        tiles = _tiles_for(rows.shape[0])
        if tiles is not None:
            return self._on_tiles(tiles, rows).view(*x.shape[:-1], self.out_features)
        kernel = kernels.small_rows_linear() if rows.shape[0] <= BF16_SMALL_ROWS else None
        if kernel is not None:
            return self._small_rows(kernel, rows, self._bfloat16_panels(kernel), None).view(
                *x.shape[:-1], self.out_features
            )
        if not PREPACKED_BF16:
            weight = self._cached("_rounded", lambda w: w.bfloat16(), torch.bfloat16)
            out = F.linear(rows.bfloat16(), weight).float()
            if self.bias is not None:
                out.add_(self.bias)
        else:
            out = self._prepacked_bfloat16(rows).float()
            return out.view(*x.shape[:-1], self.out_features)
        return self._activated(out).view(*x.shape[:-1], self.out_features)

    def _on_tiles(self, tiles, rows: Tensor) -> Tensor:
        """Rows (M, in) on the tiles kernel, an exact GELU inside it, any other activation
        after it."""
        panels = self._tiles_panels(tiles)
        if self._post_op == _EXACT_GELU:
            return tiles.linear(rows, panels, self.bias, self.out_features, "gelu")
        return self._activated(tiles.linear(rows, panels, self.bias, self.out_features))

    def _bfloat16_panels(self, kernel) -> Tensor:
        """The weight in the small-rows kernel's panels of bfloat16 pairs, kept until it
        changes."""
        return self._cached("_panels", lambda w: kernel.pack(w, None, True), torch.bfloat16)

    def _tiles_panels(self, tiles) -> Tensor:
        """The weight laid out for the tiles kernel, rounded to bfloat16, kept until it
        changes."""
        return self._cached("_tiles", tiles.pack)

    def _prepacked_bfloat16(self, rows: Tensor) -> Tensor:
        """Rows (M, in), float32 or bfloat16, rounded to bfloat16 and through oneDNN's prepacked
        bfloat16 linear, the bias and the activation fused into its call, in bfloat16 as a model
        cast to bfloat16 has them (3.4x the call followed by them in float32 at 577 rows); the
        output (M, out) in bfloat16."""
        bias = None if self.bias is None else self._bfloat16_bias()
        attr, scalars, algorithm = self._post_op
        return torch.ops.mkldnn._linear_pointwise(
            rows.bfloat16(), self._prepacked_bfloat16_weight(), bias, attr, scalars, algorithm
        )

    def _prepacked_bfloat16_weight(self) -> Tensor:
        """The weight rounded to bfloat16 in oneDNN's blocked layout, kept until it changes."""
        return self._cached(
            "_packed",
            lambda w: torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), None),
            torch.bfloat16,
        )

    def _takes_prepacked_bfloat16_rows(self) -> bool:
        """Whether bfloat16 rows from the prepacked bfloat16 linear of a layer before it, with
        as many rows (`mlp_forward`), may go straight into this layer's: precision "bf16", a
        float32 weight outside autograd."""
        return (
            self.precision == "bf16"
            and self._post_op is not None
            and self.weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and self.weight.requires_grad)
        )

    def _runs_prepacked_bfloat16(self, rows: Tensor) -> bool:
        """Whether float32 rows (M, in) go to oneDNN's prepacked bfloat16 linear
        (`_bfloat16_forward`)."""
        return (
            self._low_precision_dtype(rows) == torch.bfloat16
            and self._uses_prepacked(rows, plain_rows=False)
            and PREPACKED_BF16
            and _tiles_for(rows.shape[0]) is None
            and (rows.shape[0] > BF16_SMALL_ROWS or kernels.small_rows_linear() is None)
        )

    def _bfloat16_bias(self) -> Tensor:
        """The bias rounded to bfloat16, kept until the bias changes."""
        key = tensor_key(self.bias)
        if self._bias_bf16 is None or self._bias_bf16[0] != key:
            with torch.no_grad():
                self._bias_bf16 = (key, self.bias.detach().bfloat16())
        return self._bias_bf16[1]

    def _small_rows(self, kernel, rows: Tensor, panels: Tensor, scale: Tensor | None) -> Tensor:
        """The small-rows kernel on rows (M, in) and the activation: an exact GELU inside the
        kernel (as the rows leave it, vectors.h `vector_gelu`), any other after it."""
        if self._post_op == _EXACT_GELU:
            return kernel.linear(rows, panels, self.bias, self.out_features, scale, "gelu")
        out = kernel.linear(rows, panels, self.bias, self.out_features, scale)
        return self._activated(out)

    def _activated(self, out: Tensor) -> Tensor:
        """The activation of `out`; the identity without a module call."""
        return out if self._post_op == _NO_ACTIVATION else self.activation(out)

    def _uses_prepacked(self, x: Tensor, plain_rows: bool = True) -> bool:
        """Whether x goes to the packed weights: float32 rows on the CPU, no gradient to record,
        not compiling; `plain_rows`: fewer than `PLAIN_ROWS` rows (from there on float32 runs
        PyTorch's own linear)."""
        rows_limit = PLAIN_ROWS if plain_rows else float("inf")
        return (
            PREPACKED
            and self._post_op is not None
            and x.device.type == "cpu"
            and x.dtype == torch.float32 == self.weight.dtype
            and not (torch.is_grad_enabled() and self.weight.requires_grad)
            and 0 < x.numel() < rows_limit * self.in_features
            and not torch.compiler.is_compiling()
        )

    def _float_weight(self, x: Tensor) -> Tensor:
        """The weight the float paths multiply by: the parameter itself at "fp32" (so that
        gradients reach it), else its rounding to the precision."""
        if self.precision == "fp32":
            return self.weight
        return self._cached("_rounded", lambda w: quantized(w, self.precision)[0], x.dtype).to(
            x.dtype
        )

    def _packed_weight(self) -> Tensor:
        """The weight in oneDNN's blocked layout."""
        return self._cached(
            "_packed",
            lambda w: torch.ops.mkldnn._reorder_linear_weight(
                quantized(w, self.precision)[0], None
            ),
        )

    def _panel_weight(self, small_rows) -> tuple[Tensor, Tensor | None]:
        """The weight in the small-rows kernel's panels, and its scale (int8 panels)."""

        def pack(weight: Tensor) -> tuple[Tensor, Tensor | None]:
            if self.precision != "int8":
                return small_rows.pack(weight), None
            rounded, scale = quantized(weight, "int8")
            return small_rows.pack(rounded, scale), scale

        return self._cached("_panels", pack)

    def _cached(self, name: str, make: Callable[[Tensor], object], *extra: object):
        """`make` of the weight, kept in attribute `name` until the weight (or `extra`, part of
        the key) changes."""
        key = (tensor_key(self.weight), *extra)
        cached = getattr(self, name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, make(self.weight.detach()))
            setattr(self, name, cached)
        return cached[1]


def _tiles_for(rows: int):
    """The tiles kernel where it runs bfloat16 layers on `rows` rows (`TILES_MIN_ROWS` to
    `TILES_MAX_ROWS`, a CPU with AMX tiles), else None."""
    if rows < TILES_MIN_ROWS or rows > TILES_MAX_ROWS:
        return None
    return kernels.tiles_linear()


def mlp_forward(fc1: PackedLinear, fc2: PackedLinear, rows: Tensor, lean: bool = False) -> Tensor:
    """fc2(fc1(rows)) for float32 rows (M, in). Where both layers run oneDNN's prepacked bfloat16
    linear (precision "bf16"), the hidden rows stay in bfloat16 between them, as fc1 gives them
    and as fc2 would round them: the same values, without casting M x hidden values to float32
    and back (a model cast to bfloat16 keeps them so too). `lean`: rows as a block's lean step
    has them, which go through `rows_forward` otherwise."""
    if fc1._runs_prepacked_bfloat16(rows) and fc2._takes_prepacked_bfloat16_rows():
        return fc2._prepacked_bfloat16(fc1._prepacked_bfloat16(rows)).float()
    if lean:
        return fc2.rows_forward(fc1.rows_forward(rows))
    return fc2(fc1(rows))


# The precisions of one layer ("auto" is resolved before any layer is made).
LAYER_PRECISIONS = ("fp32", "bf16", "int8")

_compute = threading.local()


def current_compute_dtype() -> torch.dtype | None:
    """The dtype `compute_dtype` set on this thread, or None."""
    return getattr(_compute, "dtype", None)


@contextlib.contextmanager
def compute_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Within it, on this thread, float32 `PackedLinear` layers multiply in `dtype` (None: in
    their input's dtype)."""
    previous = getattr(_compute, "dtype", None)
    _compute.dtype = dtype
    try:
        yield
    finally:
        _compute.dtype = previous
