"""The arithmetic of a converted model's linear layers: `precision` of `eventful.convert`.

- "fp32": float32 weights and arithmetic (the default).
- "bf16": bfloat16 weights; each linear layer multiplies its input rows rounded to bfloat16
  and returns float32 (`PackedLinear`), and attention over every row runs in bfloat16
  (`EventfulBlock.attention_dtype`). Asked for by name, it needs hardware that multiplies
  bfloat16 natively
  (AVX512-BF16 or AMX on x86, a CPU reporting `bf16` on Arm, or CUDA); elsewhere bfloat16
  matmuls are emulated and slower than float32, so it is refused.
- "int8": int8 weights, one scale per output channel (symmetric, the largest weight of a channel
  at 127), float32 arithmetic. At the few rows an eventful step selects, a linear layer is bound
  by reading its weights, and int8 weights are a quarter of the bytes; the engine's CPU kernel
  widens them to float32 as it loads them, so this runs on any CPU with AVX2 (no VNNI needed).
  On many rows, and on other devices, the layers multiply by the same weights in float32.
- "auto": "bf16" where the hardware has it natively, else "fp32".

Whatever the precision, what later steps read stays float32: gate references, token buffers,
the exact level's running sums. So rounding does not build up over a stream; every step adds
only the rounding of its own linear layers (and at "bf16" of attention over every row). The
patch embedding, the norms and the head's convolutions stay float32. One buffer is held in
bfloat16: at "bf16" the tokenwise level's qkv buffer, where attention over every row reads it
only rounded to bfloat16 (no bias, no K/V pooling): its rows are rounded once as they are
written instead of at every step, the same values in half the memory
(`EventfulBlock._qkv_dtype`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "int8", "auto")

# CPU feature flags (/proc/cpuinfo) under which bfloat16 matrix products run natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux: the `flags` or `Features` line of /proc/cpuinfo);
    empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` multiplies bfloat16 matrices natively."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """The precision a conversion for `device` runs at: `precision` itself, or what "auto"
    picks. Refuses an unknown name, and "bf16" where `device` has no native bfloat16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        raise ValueError(
            f"precision 'bf16' needs native bfloat16 matmuls (AVX512-BF16 or AMX, or CUDA); "
            f"this {torch.device(device).type} has none, where bfloat16 runs slower than "
            f"float32: use 'int8' (int8 weights, any CPU), 'fp32' or 'auto'"
        )
    return precision


def channel_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel of a weight (out, in), float32: the scale that maps the channel's
    largest magnitude to 127 (1 for a channel of zeros)."""
    largest = weight.detach().abs().amax(dim=1).float()
    return torch.where(largest > 0, largest / 127, torch.ones_like(largest))


def quantized(weight: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The values a weight (out, in) takes at `precision`, in float32, and the per-channel
    scales for "int8" (None otherwise): "int8" rounds each weight to a whole multiple of its
    channel's scale in [-127, 127], "bf16" to the nearest bfloat16."""
    weight = weight.detach().float()
    if precision == "int8":
        scale = channel_scales(weight)
        steps = torch.clamp(torch.round(weight / scale.unsqueeze(1)), -127, 127)
        return steps * scale.unsqueeze(1), scale
    if precision == "bf16":
        return weight.bfloat16().float(), None
    return weight, None


def autocast_dtype(x: object) -> torch.dtype | None:
    """The dtype `torch.autocast` casts to on the device of tensor `x`; None where autocast is
    off there, on a device autocast does not know (the meta device) or where `x` is no tensor."""
    if not isinstance(x, torch.Tensor):
        return None
    try:
        if not torch.is_autocast_enabled(x.device.type):
            return None
    except RuntimeError:  # "unknown device type for autocast"
        return None
    return torch.get_autocast_dtype(x.device.type)
