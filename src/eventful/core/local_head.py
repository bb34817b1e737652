"""Eventful heads: convolution stacks that recompute only what a changed input position reaches.

A head made of convolutions (the saliency decoder's transposed convolutions, later a detector's
feature pyramid) is local: an input position reaches a bounded window of each layer's output. So
when only some positions of the head's input changed since the last step, each layer's output
changes only inside the windows of those positions. A `LocalStack` stands in for a chain of such
layers, `conv (pointwise)* conv (pointwise)* ...`, and keeps, per stream, each convolution's input
and its output before the pointwise layers (its *pre-activation*). A step

1. compares the stack's input with the cached one, position by position. On the encoder's
   patch grid (the input is the encoder's tokens, `HeadStep.grid`) it takes the positions of
   largest change, as the encoder's gates take tokens: per stream, the share of positions that
   the encoder's policy selects of its tokens in this step (`HeadStep.shares`); like a token
   gate's reference, the cache keeps the last value passed on, so a position left out carries
   its change to a later step. Elsewhere (the output of another stack) it takes every position
   that changed at all;
2. for each convolution, multiplies the changed positions' input deltas with the kernel and adds
   them into the cached pre-activation at the output positions they reach (a convolution is
   linear in its input, and its bias is already in the cache);
3. applies the pointwise layers (normalisation in eval mode, activations) at the output positions
   touched, and passes their change on to the next convolution.

A step in which any stream of the batch runs densely (its first step, a refresh, a new input
size), or in which the encoder's policy selects every token, runs every convolution as the
original layers do: with every token selected the stack computes exactly what the dense head
computes. Within a step, a convolution runs densely (on its cached input) when more than
`DENSE_SHARE` of its input positions changed (`LOW_PRECISION_DENSE_SHARE` where the stack
multiplies in a lower precision), when it is too small for a sparse update to pay
(`SPARSE_MIN_WORK`), or after one that ran densely. Incremental updates add deltas to cached
sums: equal to the dense head up to float rounding (README, "What is exact").

Local layers: `nn.Conv2d` and `nn.ConvTranspose2d` with one group and zero padding given as
numbers, followed by any of `POINTWISE`. The rest of a head (a global pooling, a linear layer
over pooled tokens, attention) is not local and runs densely; `eventful.convert` says so once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful.core import kernels
from eventful.core.fingerprint import ModuleWatch, tensor_key
from eventful.core.gates import error_norms_of
from eventful.core.ops import HEAD_LAYERS, layer_macs_of_sizes
from eventful.core.precision import autocast_dtype

# Layers that act on each position alone. BatchNorm2d in training mode uses batch statistics: a
# stack holding one runs densely while the model trains.
POINTWISE = (
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Identity,
    nn.Dropout,
)

# A convolution with fewer multiply-accumulates per input element than this (output channels x
# kernel elements; the saliency decoder's final 1x1 convolution to one channel has 1) runs
# densely: finding which of its inputs changed costs about as much as running it.
SPARSE_MIN_WORK = 16

# Above this share of changed input positions a convolution runs densely: its sparse update costs
# as many multiply-accumulates per changed position as the dense layer per position, plus the
# gather, the scatter and the pointwise layers on the touched rows, which cost more than the
# arithmetic. On the saliency model (2 threads, Intel Xeon with AMX, frames alternating between
# shares in one stream) 0.25 took 0.94-0.99x the step time of 0.5 on bikes.mp4 at float32 and
# bfloat16, at a quarter and at a twentieth of the tokens, and 1.01x on carphone_pristine.mp4 at
# a twentieth in float32. On bikes.mp4 in bfloat16 at a quarter of the tokens, the decoder's
# second and third stages took 3.8 and 7.2 ms per step updated sparsely, 1.8 and 2.0 densely.
# 0.1 was as fast in bfloat16 at a quarter of the tokens but slower in float32 (1.4x the step at
# a twentieth on carphone_pristine.mp4).
DENSE_SHARE = 0.25
# The same for a stack that multiplies in a lower precision (`compute_dtype`): its dense
# convolutions run on the CPU's bfloat16 units, several times faster than float32, while a sparse
# update's scatters into its float32 caches take as long as in float32, so the dense layer pays
# from a smaller share. On the saliency model at precision bf16 (same machine, interleaved in one
# process), 0.12 against 0.25 took 0.93-0.95x the step time on bikes.mp4 at 3% and 5% of the
# tokens (its second and third stages then run densely), 0.96x on carphone_pristine.mp4 at 5%,
# and the same time at 1/64 and at 10% (where 0.1 ran the first stage densely: 1.03x).
LOW_PRECISION_DENSE_SHARE = 0.12

# The final 1x1 convolution at the positions its input moved in one call of the CPU kernel
# (`kernels.head_rows_product`) where it takes the tensors and no pointwise layer follows; False
# runs the PyTorch operators (a matrix product), which round the sums otherwise.
ROWS_PRODUCT_KERNEL = True

# The input's change in one call of the CPU kernel (`kernels.head_input_change`) where it takes
# the tensors; False runs the PyTorch operators it replaces (tests compare the two).
INPUT_KERNEL = True

# Up to this many changed positions a convolution's kernel matrix multiplies on the small-rows
# kernel (which reads the matrix once from memory), above on PyTorch's matmul. Lower than the
# linear layers' bound (`packed_linear.SMALL_ROWS`): a head's convolutions have few input
# channels (64 to 256), where PyTorch's matmul measured as fast at 64 rows and faster above
# (Intel Xeon with AVX-512, 2 threads).
HEAD_SMALL_ROWS = 128

# A sparse stage after its product in one call of the CPU kernel (`kernels.head_stage`) where it
# applies; False runs it in PyTorch operators (tests compare the two).
STAGE_KERNEL = True

# A stack whose output went straight into another stack's input returns its cached output as it
# is where this is True (`LocalStack._returned`); False: a copy (tests compare the two).
HAND_ROWS = True

# A 1x1 convolution fed by another stack recomputes only where its input moved, from its output
# of the last step kept among the caches of the stack that feeds it, under this prefix
# (`LocalStack._without_own_changes`); False: every position at every step (tests compare the
# two).
FED_UPDATES = True
FED = "fed:"

# A stage run densely within a step convolves on weights packed once for oneDNN where this is
# True and `prepacks` allows (`LocalStack._convolve_prepacked`); False: PyTorch's convolution.
PREPACKED_CONVOLUTIONS = True

# What a stack keeps per stage, computed from the weights (`LocalStack.clear_weight_caches`).
WEIGHT_CACHES = ("_matrices", "_panels", "_low_matrices", "_prepacked", "_low_weights", "_norms")

# The dtypes of rows the kernels read (contributions, a dense stage's convolution output); what
# they write is float32.
KERNEL_ROWS = (torch.float32, torch.bfloat16)


def is_local_convolution(layer: nn.Module) -> bool:
    return (
        isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def prepacks(inputs: Tensor) -> bool:
    """Whether a convolution on `inputs` may run on prepacked weights (`PREPACKED_CONVOLUTIONS`):
    float32 or bfloat16 on the CPU, PyTorch built with oneDNN and its operators for packed
    weights, outside `torch.compile`."""
    if not PREPACKED_CONVOLUTIONS or not inputs.is_cpu or inputs.dtype not in KERNEL_ROWS:
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return _has_packed_operators() and not torch.compiler.is_compiling()


@functools.cache
def _has_packed_operators() -> bool:
    names = (
        "_reorder_convolution_weight",
        "_reorder_convolution_transpose_weight",
        "_convolution_pointwise",
        "_convolution_transpose_pointwise",
    )
    return all(hasattr(torch.ops.mkldnn, name) for name in names)


def sparse_pays(conv: nn.Module) -> bool:
    """Whether a sparse update of `conv` can save work (`SPARSE_MIN_WORK`)."""
    return conv.out_channels * math.prod(conv.kernel_size) >= SPARSE_MIN_WORK


def is_local_stack(module: nn.Module) -> bool:
    """A local convolution, or a `nn.Sequential` of local layers that starts with one."""
    if is_local_convolution(module):
        return True
    if not isinstance(module, nn.Sequential) or len(module) == 0:
        return False
    return is_local_convolution(module[0]) and all(
        is_local_convolution(layer) or is_pointwise(layer) for layer in module
    )


def is_pointwise(layer: nn.Module) -> bool:
    """One of `POINTWISE`; a batch norm only with running statistics (one without normalises
    with the statistics of its batch in eval mode too: every position depends on all)."""
    if isinstance(layer, nn.BatchNorm2d) and layer.running_mean is None:
        return False
    return isinstance(layer, POINTWISE)


@dataclass
class HeadStep:
    """What a wrapper hands its stacks for one step: the state's head caches (by stack name),
    whether the step runs the streams densely, the encoder's patch grid (rows, columns) and per
    stream the share of positions a stack's input on that grid passes on (`shares`, called once
    the encoder has run; None: every changed position), and the multiply-accumulates the stacks
    ran and those the dense head would have run (whole batch)."""

    caches: dict[str, dict[str, Tensor]]
    dense: bool
    grid: Callable[[], tuple[int, int]] = lambda: (0, 0)
    shares: Callable[[], list[float] | None] = lambda: None
    macs: int = 0
    dense_macs: int = 0
    # Each stack's output in this step, by stack name, with the stack: a stack whose input is
    # another's output learns that it feeds it (`LocalStack.hands_rows`).
    outputs: dict[str, tuple[LocalStack, Tensor]] = field(default_factory=dict)
    # By stack name, where every stage of it ran sparsely: the flat positions (B * H * W) where
    # its output moved in this step (elsewhere it holds its values of the last step), and what
    # the stacks it fed in its last step kept among its caches (`LocalStack._without_own_changes`).
    moved: dict[str, tuple[Tensor, dict[str, Tensor]]] = field(default_factory=dict)


class LocalStack(nn.Module):
    """Stands in for a local convolution stack (`is_local_stack`) of a wrapped model's head.

    `name` keys its caches in the stream state (`StreamState.heads`). It runs only inside a
    step of its wrapper, which sets `step`. With `compute_dtype` (bfloat16, for a model
    converted at precision "bf16"), outside autograd the convolutions of the stages that run
    densely and the products of the stages updated sparsely multiply in it; their results are
    added or returned to float32 for the caches and the layers after.
    """

    def __init__(
        self, name: str, module: nn.Module, compute_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if not is_local_stack(module):
            raise TypeError(f"{type(module).__name__} {name!r} is not a local convolution stack")
        self.name = name
        self.compute_dtype = compute_dtype
        self.layers = nn.ModuleList(module if isinstance(module, nn.Sequential) else [module])
        self.stages: list[tuple[nn.Module, list[nn.Module]]] = []
        for layer in self.layers:
            if is_local_convolution(layer):
                self.stages.append((layer, []))
            else:
                self.stages[-1][1].append(layer)
        self.step: HeadStep | None = None
        # Whether this stack's output went straight into another stack's input in an earlier
        # step: then a sparse step returns its cached output as it is (`_returned`).
        self.hands_rows = False
        self._matrices: dict[int, tuple[tuple, Tensor]] = {}  # per stage, see below
        self._panels: dict[int, tuple[tuple, Tensor]] = {}
        self._low_matrices: dict[int, tuple[tuple, Tensor]] = {}
        self._prepacked: dict[int, tuple[tuple, tuple[Tensor, Tensor | None]]] = {}
        self._low_weights: dict[int, tuple[tuple, tuple[Tensor, Tensor | None]]] = {}
        self._norms: dict[int, tuple[list, list[ModuleWatch], list]] = {}

    def clear_weight_caches(self) -> None:
        """Forget the kernel matrices, their panels, the weights in the compute dtype, those
        packed for oneDNN and the batch norms' scales and shifts (`forget_weight_caches`)."""
        for cache in WEIGHT_CACHES:
            setattr(self, cache, {})

    def __getstate__(self) -> dict:
        # The caches follow the weights: copies and pickles make them again (oneDNN's packed
        # weights cannot be copied or pickled at all).
        # A copy learns anew where its output goes.
        caches = {cache: {} for cache in WEIGHT_CACHES}
        return {**super().__getstate__(), **caches, "hands_rows": False}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for cache in WEIGHT_CACHES:  # stacks pickled before a cache existed
            if not hasattr(self, cache):
                setattr(self, cache, {})
        if not hasattr(self, "hands_rows"):
            self.hands_rows = False

    def _convolve(
        self, index: int, conv: nn.Module, inputs: Tensor, within_step: bool = False
    ) -> Tensor:
        """`conv`, the convolution of stage `index`, on inputs: in `compute_dtype` where one is
        set, outside autograd, with its weight and bias rounded to it once (kept until they
        change, `tensor_key`); the output in the inputs' dtype. `within_step` (a stage run
        densely within a step that updates the head): the output in the dtype it was computed
        in, and on the CPU by oneDNN on weights packed for it once (`_convolve_prepacked`)."""
        dtype = self.compute_dtype
        if within_step and not torch.is_grad_enabled() and prepacks(inputs):
            return self._convolve_prepacked(
                index, conv, inputs if dtype is None else inputs.to(dtype)
            )
        if dtype is None or inputs.dtype == dtype or torch.is_grad_enabled():
            return conv(inputs)
        key = (tensor_key(conv.weight), None if conv.bias is None else tensor_key(conv.bias))

        def rounded() -> tuple[Tensor, Tensor | None]:
            with torch.inference_mode(False):  # ordinary tensors, whatever mode this step is in
                bias = None if conv.bias is None else conv.bias.detach().to(dtype)
                return conv.weight.detach().to(dtype), bias

        weight, bias = _kept(self._low_weights, index, key, rounded)
        low = inputs.to(dtype)
        if isinstance(conv, nn.ConvTranspose2d):
            out = F.conv_transpose2d(
                low, weight, bias, conv.stride, conv.padding, conv.output_padding, 1, conv.dilation
            )
        else:
            out = F.conv2d(low, weight, bias, conv.stride, conv.padding, conv.dilation)
        return out if within_step else out.to(inputs.dtype)

    def _convolve_prepacked(self, index: int, conv: nn.Module, inputs: Tensor) -> Tensor:
        """`conv` on inputs in their dtype, by oneDNN on its weight reordered once into the
        layout oneDNN's convolution for this input size takes (kept until the weight, the bias,
        the dtype or the size changes): PyTorch's convolution reorders the weight on every call.
        The saliency decoder's transposed convolutions on cold caches (2 threads, Intel Xeon with
        AMX): 1.5 / 0.95 / 0.66 ms per call in bfloat16 with the reorder, 0.58 / 0.60 / 0.56
        without; 6.1 / 4.1 / 4.7 and 2.7 / 3.7 / 3.5 ms in float32; the outputs equal."""
        dtype, shape = inputs.dtype, list(inputs.shape)
        bias_key = None if conv.bias is None else tensor_key(conv.bias)
        key = (tensor_key(conv.weight), bias_key, dtype, tuple(shape))
        mkldnn = torch.ops.mkldnn
        if isinstance(conv, nn.ConvTranspose2d):
            reorder, convolve = (
                mkldnn._reorder_convolution_transpose_weight,
                mkldnn._convolution_transpose_pointwise,
            )
            geometry = [conv.padding, conv.output_padding, conv.stride, conv.dilation]
        else:
            reorder, convolve = mkldnn._reorder_convolution_weight, mkldnn._convolution_pointwise
            geometry = [conv.padding, conv.stride, conv.dilation]
        geometry = [list(values) for values in geometry]

        def packed() -> tuple[Tensor, Tensor | None]:
            with torch.inference_mode(False):  # as in `_convolve`
                bias = None if conv.bias is None else conv.bias.detach().to(dtype)
                return reorder(conv.weight.detach().to(dtype), *geometry, 1, shape), bias

        weight, bias = _kept(self._prepacked, index, key, packed)
        return convolve(inputs, weight, bias, *geometry, 1, "none", [], None)

    def _norm_operands(self, index: int, pointwise: list[nn.Module]) -> tuple[list, list, bool]:
        """Per pointwise layer of stage `index` its batch norm's scale and shift, or None and
        None (a ReLU), and whether to round as a fused multiply-add (`addcmul_fuses`), as the
        kernels take them; kept while the norms hold the same statistics and parameters
        (`ModuleWatch`) and eps: computed anew, they took about 0.2 ms a step on the saliency
        decoder."""
        norms = [layer for layer in pointwise if isinstance(layer, nn.BatchNorm2d)]
        eps = [layer.eps for layer in norms]
        kept = self._norms.get(index)
        if kept is None or kept[0] != eps or not all(watch.unchanged() for watch in kept[1]):
            with torch.inference_mode(False):  # as in `_convolve`
                operands = [
                    batch_norm_scale_and_shift(layer)
                    if isinstance(layer, nn.BatchNorm2d)
                    else (None, None)
                    for layer in pointwise
                ]
            kept = (eps, [ModuleWatch(layer) for layer in norms], operands)
            self._norms[index] = kept
        operands = kept[2]
        scales, shifts = [scale for scale, _ in operands], [shift for _, shift in operands]
        return scales, shifts, addcmul_fuses()

    def _kernel_matrix(self, index: int, conv: nn.Module) -> Tensor:
        """The weight of `conv`, the convolution of stage `index`, as (C_in, K * C_out): row c
        holds what a unit delta of input channel c adds to each output channel at each kernel
        offset. Kept until the weight changes (`tensor_key`)."""
        weight = conv.weight

        def laid_out() -> Tensor:
            order = (0, 2, 3, 1) if isinstance(conv, nn.ConvTranspose2d) else (1, 2, 3, 0)
            return weight.detach().permute(order).reshape(weight.shape[order[0]], -1).contiguous()

        return _kept(self._matrices, index, tensor_key(weight), laid_out)

    def _contributions(self, index: int, conv: nn.Module, deltas: Tensor) -> Tensor:
        """deltas (m, C_in) times the kernel matrix of stage `index`: (m, K * C_out). In
        `compute_dtype` where one is set, outside autograd, on the matrix rounded to it once
        (kept until the weight changes): the contributions in that dtype. Else, up to
        `HEAD_SMALL_ROWS` float32 CPU rows outside autograd, the small-rows kernel on the matrix
        laid out in its panels (kept likewise), which reads it once from memory.
        """
        matrix = self._kernel_matrix(index, conv)
        dtype = self.compute_dtype
        if dtype is not None and deltas.dtype != dtype and not torch.is_grad_enabled():

            def rounded() -> Tensor:
                with torch.inference_mode(False):  # as in `_convolve`
                    return matrix.to(dtype)

            low = _kept(self._low_matrices, index, tensor_key(conv.weight), rounded)
            return deltas.to(dtype) @ low
        small_rows = None
        if deltas.shape[0] <= HEAD_SMALL_ROWS and kernels.can_take(deltas, matrix):
            small_rows = kernels.small_rows_linear()
        if small_rows is None:
            return deltas @ matrix
        panels = _kept(
            self._panels, index, tensor_key(conv.weight), lambda: small_rows.pack(matrix.t())
        )
        return small_rows.linear(deltas, panels, None, matrix.shape[1])

    def forward(self, inputs: Tensor) -> Tensor:
        if autocast_dtype(inputs) is None:
            return self._forward(inputs)
        # Under torch.autocast: float32, as the caches are, whatever the layers before gave.
        with torch.autocast(inputs.device.type, enabled=False):
            return self._forward(inputs.float())

    def _forward(self, inputs: Tensor) -> Tensor:
        step = self.step
        if step is None:
            raise RuntimeError(
                f"the eventful head {self.name!r} runs only inside a step of its eventful model "
                "(call the converted model or its stream, not the inner module)"
            )
        feeder = _feeding_stack(step, inputs)
        if feeder is not None:
            step.outputs[feeder][0].hands_rows = True
        outputs = self._output(step, inputs, feeder)
        step.outputs[self.name] = (self, outputs)
        return outputs

    def _output(self, step: HeadStep, inputs: Tensor, feeder: str | None) -> Tensor:
        """This step's output of the stack for inputs (B, C, H, W), which are the output of the
        stack named `feeder` in this step, if any."""
        if inputs.dim() != 4:
            raise ValueError(
                f"the head {self.name!r} expects (B, C, H, W) inputs, got {tuple(inputs.shape)}"
            )
        shapes = [tuple(inputs.shape)]
        for conv, _ in self.stages:
            shapes.append(output_shape(conv, shapes[-1]))
        caches = step.caches.get(self.name)
        shares = step.shares()
        dense_step = step.dense or (shares is not None and all(share >= 1 for share in shares))
        dense = (
            dense_step
            or caches is None
            or tuple(caches["input0"].shape) != (positions(shapes[0]), shapes[0][1])
            or caches["input0"].dtype != inputs.dtype
            or caches["input0"].device != inputs.device
            or any(isinstance(layer, nn.BatchNorm2d) and layer.training for layer in self.layers)
        )
        if not any(sparse_pays(conv) for conv, _ in self.stages):
            return self._without_own_changes(step, inputs, feeder, shapes, dense_step)
        if dense:
            # The original layers on the input itself; their results become the caches.
            step.caches[self.name] = caches = {"input0": flat_copy(inputs)}
            outputs = inputs
            for index, (conv, pointwise) in enumerate(self.stages):
                step.dense_macs += dense_convolution_macs(conv, shapes[index])
                outputs = self._dense_stage(index, conv, pointwise, outputs, caches)
            return outputs
        # What stacks fed by this one's output kept in its caches (`_without_own_changes`): theirs
        # to take in this step only, where this one says where its output moved.
        fed = {key: caches.pop(key) for key in [key for key in caches if key.startswith(FED)]}
        change = self._input_change(inputs, caches, shares)
        _own_memory(caches, f"input{len(self.stages)}")
        dense_share = DENSE_SHARE if self.compute_dtype is None else LOW_PRECISION_DENSE_SHARE
        outputs = None
        for index, (conv, pointwise) in enumerate(self.stages):
            step.dense_macs += dense_convolution_macs(conv, shapes[index])
            if outputs is None and (
                len(change[0]) > dense_share * positions(shapes[index]) or not sparse_pays(conv)
            ):
                # From here on densely, on the cached input, which holds the changes passed on
                # (in rows: a channels-last view, no copy).
                outputs = unflat(caches[f"input{index}"], shapes[index])
            if outputs is not None:
                outputs = self._dense_stage(index, conv, pointwise, outputs, caches, True)
            else:
                change = self._sparse_stage(index, conv, pointwise, caches, change, shapes)
        if outputs is None:  # every stage sparse: the output moved where the last one did
            step.moved[self.name] = (change[0], fed)
        return self._returned(outputs, caches[f"input{len(self.stages)}"], shapes[-1])

    def _without_own_changes(
        self,
        step: HeadStep,
        inputs: Tensor,
        feeder: str | None,
        shapes: list[tuple[int, ...]],
        dense_step: bool,
    ) -> Tensor:
        """A stack whose convolutions save nothing by finding the changes of their input (the
        saliency decoder's final 1x1 convolution: finding them reads more than the product):
        its layers on the whole input, off dense steps a 1x1 convolution as a matrix product
        (on the CPU, oneDNN's convolution to a few output channels is several times slower).

        Except where its input is the output of another stack (`feeder`) and it is one 1x1
        convolution and pointwise layers (`_keeps_output_rows`): it keeps its output in rows
        among the caches of that stack, under `FED` and its name, and where that stack says
        where its output moved in this step and hands back what this one kept in its last step
        (`HeadStep.moved`: the feeding stack's previous output, which this one read), recomputes
        those positions alone. A step that runs the feeding stack without this one drops what
        it kept."""
        dense_macs = [
            dense_convolution_macs(conv, shapes[index])
            for index, (conv, _) in enumerate(self.stages)
        ]
        step.dense_macs += sum(dense_macs)
        # Outside autograd: the kept rows would hold every step's graph.
        if not (FED_UPDATES and not torch.is_grad_enabled() and self._keeps_output_rows()):
            feeder = None
        key = f"{FED}{self.name}"
        moved, kept = None, None
        if feeder is not None and not dense_step and feeder in step.moved:
            moved, fed = step.moved[feeder]
            kept = fed.get(key)
        output_rows = (positions(shapes[-1]), shapes[-1][1])
        if (
            kept is not None
            and tuple(kept.shape) == output_rows
            and kept.dtype == inputs.dtype
            and kept.device == inputs.device
        ):
            conv, pointwise = self.stages[0]
            source = flat(inputs)
            weight = conv.weight.reshape(conv.out_channels, conv.in_channels)
            step.macs += len(moved) * conv.in_channels * conv.out_channels
            kernel = kernels.head_rows_product() if ROWS_PRODUCT_KERNEL else None
            if (
                kernel is not None
                and not pointwise
                and kernels.can_take(source, weight, kept)
                and source.is_contiguous()
                and weight.is_contiguous()
                and (conv.bias is None or kernels.can_take(conv.bias))
            ):
                kernel(source, moved, weight, conv.bias, kept)
            else:
                outputs = source.index_select(0, moved) @ weight.t()
                if conv.bias is not None:
                    outputs += conv.bias
                for layer in pointwise:
                    outputs = pointwise_on_rows(layer, outputs)
                kept.index_copy_(0, moved, outputs)
            step.caches[feeder][key] = kept
            return channels_first_copy(kept, shapes[-1])
        step.macs += sum(dense_macs)
        outputs = inputs
        for conv, pointwise in self.stages:
            outputs = conv(outputs) if dense_step else convolution_as_product(conv, outputs)
            for layer in pointwise:
                outputs = layer(outputs)
        if feeder is not None and feeder in step.caches:
            step.caches[feeder][key] = flat_copy(outputs)
        return outputs

    def _keeps_output_rows(self) -> bool:
        """Whether this stack is one 1x1 convolution and pointwise layers (no batch norm in
        training), which `_without_own_changes` updates at the positions its input moved."""
        if len(self.stages) != 1 or not is_one_by_one(self.stages[0][0]):
            return False
        return not any(
            isinstance(layer, nn.BatchNorm2d) and layer.training for layer in self.layers
        )

    def _returned(self, outputs: Tensor | None, last: Tensor, shape: tuple[int, ...]) -> Tensor:
        """What a step that updated the stack returns: its last stage's output, which is in the
        cache `last` (a sparse stage's, or a dense one's by `_pointwise_into_cache`: `outputs`
        None or a view of it) or its own tensor `outputs`.

        As a contiguous tensor of its own, as the original layers return it; or, where the
        output went straight into another stack in an earlier step (`hands_rows`, the saliency
        decoder's transposed convolutions into its final 1 x 1 convolution), as it is: a
        channels-last view of the cache, which the next stack reads as its rows. Copying
        64 x 128 x 128 floats took about a thirtieth of a still camera's step. The next step
        copies the cache before writing into it wherever anything else still holds its memory
        (`_own_memory`), so that an output kept by anyone keeps its values."""
        in_cache = outputs is None or outputs.data_ptr() == last.data_ptr()
        if HAND_ROWS and self.hands_rows and _can_count_holders():
            return unflat(last, shape) if in_cache else outputs
        return channels_first_copy(last, shape) if in_cache else channels_first(outputs)

    def _input_change(
        self, inputs: Tensor, caches: dict[str, Tensor], shares: list[float] | None
    ) -> tuple[Tensor, Tensor]:
        """The input positions passed on in this step (flat indices), and their deltas: per
        stream the `shares` of positions of largest change that changed (every changed
        position without shares, or at another grid). One call of the CPU kernel where it
        takes the tensors (`kernels.head_input_change`), the same as the operators below."""
        current = flat(inputs)
        cached = caches["input0"]
        counts = self._input_counts(inputs, shares)
        self.step.macs += 2 * current.numel()  # a subtraction and a square per element
        kernel = kernels.head_input_change() if INPUT_KERNEL else None
        if kernel is not None and kernels.can_take(current, cached) and current.is_contiguous():
            return kernel(current, cached, counts)
        # In one pass without a temporary where the gates' kernel takes them.
        norms = error_norms_of(current.unsqueeze(0), cached.unsqueeze(0), 2).squeeze(0)
        batch = inputs.shape[0]
        per_stream = norms.view(batch, -1)
        count = per_stream.shape[1]
        if not counts:
            changed = norms.ne(0).nonzero().squeeze(1)
        else:
            chosen = []
            for stream, k in enumerate(counts):
                top = per_stream[stream].topk(k, sorted=False).indices
                top = top[per_stream[stream, top] > 0]  # an unchanged position needs nothing
                chosen.append(top + stream * count)
            changed = torch.cat(chosen)
        # Rows by index_select: advanced indexing takes several times as long for rows.
        rows = current.index_select(0, changed)
        difference = rows - cached.index_select(0, changed)
        cached.index_copy_(0, changed, rows)
        return changed, difference

    def _input_counts(self, inputs: Tensor, shares: list[float] | None) -> list[int]:
        """Per stream, how many positions of largest change a step takes from the input: its
        share of the positions, at least one; none (every changed position) without shares or
        at another grid than the encoder's."""
        if shares is None or tuple(inputs.shape[2:]) != self.step.grid():
            return []
        count = positions(tuple(inputs.shape)) // inputs.shape[0]
        return [min(count, max(1, round(share * count))) for share in shares]

    def _dense_stage(
        self,
        index: int,
        conv: nn.Module,
        pointwise: list[nn.Module],
        inputs: Tensor,
        caches: dict[str, Tensor],
        into_cache: bool = False,
    ) -> Tensor:
        """Stage `index` on its whole input, as the original layers run (the convolution in
        `compute_dtype` where one is set); its output. `into_cache`, within a step that updates
        the head (after stages that ran sparsely, or from the cached input): where the stage's
        pointwise layers are batch norms (eval) and ReLUs, they write its output rows straight
        into the memory of its cached output from the last step (`_pointwise_into_cache`). A
        dense step runs the original layers."""
        pre = self._convolve(index, conv, inputs, within_step=into_cache)
        self.step.macs += dense_convolution_macs(conv, tuple(inputs.shape))
        if into_cache:
            outputs = self._pointwise_into_cache(index, pre, pointwise, caches, inputs.dtype)
            if outputs is not None:
                return outputs
            pre = pre.to(inputs.dtype)
        outputs = pre
        for layer in pointwise:
            outputs = layer(outputs)
        # The output is the next stage's input and may be returned: the caches get their own
        # memory (the pre-activation may stay a view of `pre` where that is not the output).
        caches[f"pre{index}"] = flat_copy(pre) if outputs is pre else rows_of(pre)
        caches[f"input{index + 1}"] = flat_copy(outputs)
        return outputs

    def _pointwise_into_cache(
        self,
        index: int,
        pre: Tensor,
        pointwise: list[nn.Module],
        caches: dict[str, Tensor],
        dtype: torch.dtype,
    ) -> Tensor | None:
        """Stage `index`'s batch norms (eval) and ReLUs on its convolution's output `pre` (in
        `dtype`, the caches', or in `compute_dtype`), written as `pointwise_on_rows` computes
        them into the memory of the stage's cached output from the last step; the output, a
        channels-last view of that cache. None where the stage has other pointwise layers or
        none, no cache yet, or gradients to record. On float32 CPU caches, one pass of the
        kernel (`kernels.head_pointwise`), which also widens a bfloat16 `pre` into the memory
        of the cached pre-activation.

        On the saliency decoder's last stage (64 x 128 x 128), the normalisation, the ReLU and
        the cache's copy each took about 1 ms as separate passes over fresh memory."""
        cached = caches.get(f"input{index + 1}")
        if not _norms_and_relus(pointwise) or cached is None or torch.is_grad_enabled():
            return None
        rows = rows_of(pre)
        cached = _reused(cached, rows, dtype)
        kernel = None
        if STAGE_KERNEL and kernels.can_take(cached) and rows.is_cpu and rows.dtype in KERNEL_ROWS:
            kernel = kernels.head_pointwise()
        if kernel is not None:
            # The convolution's own output (memory of its own) is the pre-activation; one in
            # another dtype is widened into the memory of the last step's.
            kept = rows if rows.dtype == dtype else _reused(caches.get(f"pre{index}"), rows, dtype)
            operands = self._norm_operands(index, pointwise)
            kernel(rows, None if kept is rows else kept, cached, *operands)
        else:
            kept = rows = rows.to(dtype)
            source = rows
            for layer in pointwise:
                if isinstance(layer, nn.BatchNorm2d):
                    scale, shift = batch_norm_scale_and_shift(layer)
                    torch.addcmul(shift, source, scale, out=cached)
                else:
                    torch.clamp_min(source, 0, out=cached)
                source = cached
        caches[f"pre{index}"] = kept
        caches[f"input{index + 1}"] = cached
        return unflat(cached, tuple(pre.shape))

    def _sparse_stage(
        self,
        index: int,
        conv: nn.Module,
        pointwise: list[nn.Module],
        caches: dict[str, Tensor],
        change: tuple[Tensor, Tensor],
        shapes: list[tuple[int, ...]],
    ) -> tuple[Tensor, Tensor]:
        """Add the input deltas of stage `index` into its pre-activation where they reach, apply
        the pointwise layers there; the positions of its output that changed, and by how much."""
        changed, deltas = change
        _, _, height, width = shapes[index]
        _, out_channels, out_height, out_width = shapes[index + 1]
        kernel_h, kernel_w = conv.kernel_size
        contributions = self._contributions(index, conv, deltas)
        # The delta product; the scattered adds and one subtraction per touched output element
        # follow.
        self.step.macs += deltas.numel() * kernel_h * kernel_w * out_channels
        pre, cached = caches[f"pre{index}"], caches[f"input{index + 1}"]
        kernel = _head_stage_kernel(pointwise, contributions, pre, cached)
        if kernel is not None:
            moved, difference, counts = kernel(
                changed,
                contributions.contiguous(),
                pre,
                cached,
                *self._norm_operands(index, pointwise),
                isinstance(conv, nn.ConvTranspose2d),
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                (height, width),
                (out_height, out_width),
            )
            self.step.macs += sum(counts.tolist()) * out_channels
            return moved, difference
        # Widened where they were multiplied in `compute_dtype` (exact), as the kernel adds them.
        contributions = contributions.float().view(-1, kernel_h * kernel_w, out_channels)
        stream, rest = changed // (height * width), changed % (height * width)
        rows = reach(conv, 0, rest // width, out_height)
        cols = reach(conv, 1, rest % width, out_width)
        row, row_ok = rows[0][:, :, None], rows[1][:, :, None]
        col, col_ok = cols[0][:, None, :], cols[1][:, None, :]
        valid = (row_ok & col_ok).flatten().nonzero().squeeze(1)  # of (position, offset)
        targets = (stream[:, None, None] * out_height + row) * out_width + col
        targets = targets.flatten().index_select(0, valid)
        pre.index_add_(0, targets, contributions.view(-1, out_channels).index_select(0, valid))
        touched = sorted_distinct(targets, pre.shape[0])
        outputs = pre.index_select(0, touched)
        for layer in pointwise:
            outputs = pointwise_on_rows(layer, outputs)
        difference = outputs - cached.index_select(0, touched)
        cached.index_copy_(0, touched, outputs)
        # The rows with a nonzero (or NaN) difference: abs and amax run several times faster
        # than ne and any here.
        moved = difference.abs().amax(1).ne(0).nonzero().squeeze(1)
        self.step.macs += (len(targets) + len(touched)) * out_channels
        return touched.index_select(0, moved), difference.index_select(0, moved)


def _head_stage_kernel(
    pointwise: list[nn.Module], contributions: Tensor, pre: Tensor, cached: Tensor
) -> Callable[..., tuple[Tensor, Tensor, Tensor]] | None:
    """`kernels.head_stage` where it computes what the Python stage computes: pointwise layers
    that are batch norms in eval mode and ReLUs, float32 CPU caches outside autograd,
    contributions in float32 or bfloat16 on the CPU, contiguous caches; else None."""
    if not STAGE_KERNEL or not _norms_and_relus(pointwise, allow_none=True):
        return None
    if not kernels.can_take(pre, cached) or torch.is_grad_enabled():
        return None
    if not contributions.is_cpu or contributions.dtype not in KERNEL_ROWS:
        return None
    if not (pre.is_contiguous() and cached.is_contiguous()):
        return None
    return kernels.head_stage()


def _norms_and_relus(pointwise: list[nn.Module], allow_none: bool = False) -> bool:
    """Whether a stage's pointwise layers are all batch norms in eval mode and ReLUs (exactly
    those types: a subclass may compute something else), and at least one unless `allow_none`:
    what the kernels and `_pointwise_into_cache` compute themselves."""
    return (allow_none or len(pointwise) > 0) and all(
        type(layer) is nn.ReLU or (type(layer) is nn.BatchNorm2d and not layer.training)
        for layer in pointwise
    )


def _reused(kept: Tensor | None, like: Tensor, dtype: torch.dtype) -> Tensor:
    """`kept` where it can take `like`'s values in `dtype` (the same shape, that dtype,
    contiguous), else new memory for them."""
    if kept is None or kept.shape != like.shape or kept.dtype != dtype or not kept.is_contiguous():
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    return kept


def _kept(cache: dict, index: int, key: object, make: Callable[[], object]):
    """What `cache` keeps for stage `index`, made anew by `make` when it was made under another
    `key` (the stage's weights changed, `tensor_key`)."""
    kept = cache.get(index)
    if kept is None or kept[0] != key:
        kept = (key, make())
        cache[index] = kept
    return kept[1]


def _can_count_holders() -> bool:
    """Whether this PyTorch tells how many tensors hold a storage (`_holders`)."""
    return hasattr(torch._C, "_storage_Use_Count")


def _holders(tensor: Tensor) -> int:
    """How many tensors (and storage objects) hold the memory of `tensor`, itself included."""
    # The storage object made here holds it too.
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) - 1


def _own_memory(caches: dict[str, Tensor], key: str) -> None:
    """caches[key] replaced by a copy where anything else holds its memory (an output handed
    out as a view of it, `LocalStack._returned`), so that writing into the cache leaves that
    holder's values as they were."""
    cache = caches.get(key)
    if cache is not None and _can_count_holders() and _holders(cache) > 1:
        caches[key] = cache.clone()


def sorted_distinct(indices: Tensor, size: int) -> Tensor:
    """The distinct values of `indices` (each in [0, size)) in ascending order, as
    `indices.unique()` gives them, through a mark per value: at a few thousand indices several
    times faster than `unique`'s sort."""
    marks = torch.zeros(size, dtype=torch.bool, device=indices.device)
    marks[indices] = True
    return marks.nonzero().squeeze(1)


def is_one_by_one(conv: nn.Module) -> bool:
    """Whether `conv` is a 1x1 convolution with stride 1 and no padding, dilation or groups: a
    matrix product of its (O, C) weight with each position's C channels."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _feeding_stack(step: HeadStep, inputs: Tensor) -> str | None:
    """The name of the stack whose output in this step inputs are, if any."""
    for name, (_, output) in step.outputs.items():
        if output is inputs:
            return name
    return None


def convolution_as_product(conv: nn.Module, inputs: Tensor) -> Tensor:
    """`conv` on inputs (B, C, H, W); a 1x1 convolution (`is_one_by_one`) as one matrix product
    of its (O, C) weight with each stream's (C, H W) positions (equal to the convolution up to
    float rounding), any other layer as it is."""
    if not is_one_by_one(conv):
        return conv(inputs)
    batch, channels, height, width = inputs.shape
    weight = conv.weight.view(conv.out_channels, channels)
    outputs = torch.matmul(weight, inputs.reshape(batch, channels, height * width))
    if conv.bias is not None:
        outputs += conv.bias.view(1, -1, 1)
    return outputs.view(batch, conv.out_channels, height, width)


def pointwise_on_rows(layer: nn.Module, rows: Tensor) -> Tensor:
    """A pointwise layer on positions in rows (P, C): batch norm (eval) as its per-channel
    scale and shift, elementwise layers as they are."""
    if not isinstance(layer, nn.BatchNorm2d):
        return layer(rows)
    scale, shift = batch_norm_scale_and_shift(layer)
    return torch.addcmul(shift, rows, scale)


@functools.cache
def addcmul_fuses() -> bool:
    """Whether PyTorch's `addcmul` on the CPU rounds a batch norm's product and sum once (a
    fused multiply-add: its kernels built for AVX2 and above) or twice (its kernel for CPUs
    without): the head's kernels round as it does, so that they equal the Python stages bit for
    bit. 1 + 2^-12 squared needs more bits than a float has; only the fused form keeps them."""
    values = torch.full((64,), 1 + 2**-12)  # enough values for the vectorised kernel
    return bool(torch.addcmul(torch.full((64,), -(1 + 2**-11)), values, values).ne(0).all())


def batch_norm_scale_and_shift(layer: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """A batch norm in eval mode as its per-channel scale and shift: x * scale + shift."""
    scale = torch.rsqrt(layer.running_var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    shift = -layer.running_mean * scale
    if layer.bias is not None:
        shift = shift + layer.bias
    return scale, shift


def reach(conv: nn.Module, axis: int, coordinates: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """For input coordinates (m,) along `axis`, the output coordinate each kernel offset reaches
    (m, kernel) and whether it lies inside the output (of `size` along that axis)."""
    kernel, stride = conv.kernel_size[axis], conv.stride[axis]
    padding, dilation = conv.padding[axis], conv.dilation[axis]
    offsets = torch.arange(kernel, device=coordinates.device) * dilation
    if isinstance(conv, nn.ConvTranspose2d):
        # Input i feeds outputs i * stride - padding + offset.
        reached = coordinates[:, None] * stride - padding + offsets[None, :]
        inside = (reached >= 0) & (reached < size)
        return reached.clamp(0, size - 1), inside
    # Output o reads inputs o * stride - padding + offset: input i feeds o = (i + padding -
    # offset) / stride where that divides.
    shifted = coordinates[:, None] + padding - offsets[None, :]
    reached = torch.div(shifted, stride, rounding_mode="floor")
    inside = (shifted % stride == 0) & (shifted >= 0) & (reached < size)
    return reached.clamp(0, size - 1), inside


def positions(shape: tuple[int, ...]) -> int:
    """Positions (B * H * W) of a (B, C, H, W) shape."""
    return shape[0] * shape[2] * shape[3]


def flat(inputs: Tensor) -> Tensor:
    """(B, C, H, W) -> (B * H * W, C), positions in row-major order per stream."""
    batch, channels, height, width = inputs.shape
    return inputs.permute(0, 2, 3, 1).reshape(batch * height * width, channels)


def rows_of(inputs: Tensor) -> Tensor:
    """`flat` as a view where the memory allows it (a channels-last tensor), else a copy
    (`flat_copy`: a contiguous float32 CPU tensor by the transposing kernel, which took 0.26 ms
    against 0.95 for PyTorch's copy of the permuted view at the saliency decoder's last stage,
    64 x 128 x 128: a dense step's pre-activation; 2 threads, Intel Xeon, warm caches)."""
    rows = flat(inputs)
    return rows if rows.is_contiguous() else flat_copy(inputs)


def flat_copy(inputs: Tensor) -> Tensor:
    """`flat` into new, contiguous memory: a cache that shares nothing with `inputs`."""
    batch, channels, height, width = inputs.shape
    kernel = _transpose_kernel(inputs)
    if kernel is not None and inputs.is_contiguous():
        return kernel(inputs.view(batch, channels, height * width)).view(-1, channels)
    return flat(inputs).clone(memory_format=torch.contiguous_format)


def channels_first_copy(rows: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Rows (B * H * W, C) into new memory as a contiguous (B, C, H, W) tensor: an output that
    shares nothing with the cache it comes from."""
    batch, channels, height, width = shape
    kernel = _transpose_kernel(rows)
    if kernel is not None and rows.is_contiguous():
        return kernel(rows.view(batch, height * width, channels)).view(shape)
    return unflat(rows, shape).clone(memory_format=torch.contiguous_format)


def channels_first(outputs: Tensor) -> Tensor:
    """outputs (B, C, H, W) contiguous: as they are, or copied. Stages that ran densely on a
    cached input give channels-last outputs, which the transposing copy (`channels_first_copy`)
    turns around several times faster than `contiguous`."""
    if outputs.is_contiguous(memory_format=torch.channels_last) and not outputs.is_contiguous():
        return channels_first_copy(flat(outputs), tuple(outputs.shape))
    return outputs.contiguous()


def _transpose_kernel(x: Tensor) -> Callable[[Tensor], Tensor] | None:
    """The CPU kernel of a transposing copy where it applies (`kernels.can_take`): PyTorch's copy
    of a permuted view is several times slower."""
    return kernels.transposed() if kernels.can_take(x) else None


def unflat(rows: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(B * H * W, C) -> a (B, C, H, W) view."""
    batch, channels, height, width = shape
    return rows.view(batch, height, width, channels).permute(0, 3, 1, 2)


def output_shape(conv: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The (B, C, H, W) output shape of a local convolution for an input shape."""
    sizes = []
    for axis, size in enumerate(input_shape[2:]):
        kernel, stride = conv.kernel_size[axis], conv.stride[axis]
        padding, dilation = conv.padding[axis], conv.dilation[axis]
        span = dilation * (kernel - 1) + 1
        if isinstance(conv, nn.ConvTranspose2d):
            extra = conv.output_padding[axis]
            sizes.append((size - 1) * stride - 2 * padding + span + extra)
        else:
            sizes.append((size + 2 * padding - span) // stride + 1)
    return (input_shape[0], conv.out_channels, *sizes)


def dense_convolution_macs(conv: nn.Module, input_shape: tuple[int, ...]) -> int:
    """`layer_macs` of a local convolution run densely on an input of `input_shape`."""
    outputs = output_shape(conv, input_shape)
    return layer_macs_of_sizes(conv, math.prod(input_shape), math.prod(outputs))


def convert_heads(
    model: nn.Module, encoder_path: str, compute_dtype: torch.dtype | None = None
) -> tuple[list[str], list[str]]:
    """Replace, in place, every outermost local stack of `model` outside the module at
    `encoder_path` by a `LocalStack` (with `compute_dtype`, see there); returns the stacks'
    names and the names of the head's other layers with weights, which run densely (a linear
    layer, attention, ...)."""
    stacks: list[str] = []
    dense: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or _inside(name, [encoder_path, *stacks]):
            continue
        if is_local_stack(module):
            parent, _, child = name.rpartition(".")
            stack = LocalStack(name, module, compute_dtype)
            setattr(model.get_submodule(parent), child, stack)
            stacks.append(name)
        elif isinstance(module, HEAD_LAYERS) or (
            not is_pointwise(module) and next(module.parameters(recurse=False), None) is not None
        ):
            dense.append(f"{name} ({type(module).__name__})")
    return stacks, dense


def _inside(name: str, paths: list[str]) -> bool:
    return any(name == path or name.startswith(path + ".") for path in paths)
