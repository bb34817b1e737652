"""CPU kernels of our own, built on this machine the first time they are needed.

The sources of this folder build into one library of dispatcher operators
(`torch.ops.eventful.*`, which profilers list by those names):

- `small_rows_linear()`: `small_rows_linear.cpp`, a linear layer on the few rows an eventful step
  selects, as its two operators `pack` and `linear`;
- `swap_key_contributions()`: `swap_key_contributions.cpp`, the exact level's update of its
  running softmax sums for a few changed keys;
- `gate_error_norms()`: `gate_error_norms.cpp`, a token gate's error norms in one pass;
- `attention_rows()`: `attention_rows.cpp`, softmax attention of some query rows over every key,
  with each row's log-sum-exp;
- `transposed()`: `transpose.cpp`, the last two dimensions of a tensor swapped into new memory:
  a convolutional head's channels-last rows to PyTorch's default layout and back;
- `head_stage()`, `head_pointwise()`, `head_rows_product()` and `head_input_change()`:
  `head_stage.cpp`, a convolutional head's sparse stage after its product (the changed
  positions' contributions added where they reach, the pointwise layers on the rows touched, the
  change passed on), the pointwise layers of a dense stage written into its cached output in one
  pass, a 1x1 convolution recomputed at some positions of its kept output, and what a step
  passes on from the head's input (the positions of largest change and their deltas);
- `exact_attention_update()`: `exact_update.cpp`, one step of the exact level's attention over
  each stream's whole sequence in one call;
- `full_attention_update()`: `full_update.cpp`, one step of the full level's attention update
  (no bias) in one call;
- `commit_rows()` and `add_rows()`: `token_rows.cpp`, a gate's selected rows gathered as its
  reference takes them, and a token buffer's new rows written as it is added to the residual
  stream, each in one pass.
- `bfloat16_attention()`: `bfloat16_attention.cpp`, attention of every row in bfloat16 on AMX
  tiles, where the CPU has them;
- `tiles_linear()`: `tiles_linear.cpp`, a linear layer in bfloat16 on AMX tiles, where the CPU
  has them;
- `block_step()` and `blocks_step()`: `block_step.cpp`, a block's whole step at the exact or
  tokenwise level, the kernels above called one after the other from C++ (`operators.h`
  declares them), and consecutive blocks' steps in one call.

`vectors.h` holds what they share: vectors of 16 floats where the build has AVX-512, else 8,
their reductions, an exponential; `row_attention.h` and `key_swap.h` the rows' attention and the
swap, which several kernels call; `bfloat16.h` conversions to bfloat16 and back, rounded as
PyTorch rounds; `tiles.h` the AMX tiles' build guard, permission and layout, which the two AMX
kernels share.

Each returns None where the library cannot be built: no C++ compiler, or `EVENTFUL_CPU_KERNELS=0`
in the environment when the kernels are first asked for. Callers then use PyTorch's own
operators, with the same results up to rounding.

The build (one to two minutes, once) goes through `torch.utils.cpp_extension`, for this CPU's
instruction set (`-march=native`), and is cached under `TORCH_EXTENSIONS_DIR` (default
`~/.cache/torch_extensions`) under a name that includes the CPU's model and features, so that a
cache shared between machines never hands one CPU the other's build. A build prints one line to
stderr when it starts; a failed build warns once and is remembered in the cache (a file beside
the build), so that later processes fall back without trying again.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))  # included by the sources
DISABLE = "EVENTFUL_CPU_KERNELS"
NAME = "cpu_kernels"

_lock = threading.Lock()
_loaded: dict[str, bool] = {}


def small_rows_linear() -> SimpleNamespace | None:
    """The small-rows linear kernel (`pack`, `linear`), built on first use; None if unavailable."""
    return _small_rows_operators() if _available() else None


@functools.cache
def _small_rows_operators() -> SimpleNamespace:
    # Made once: every linear layer of a step asks for it.
    ops = torch.ops.eventful
    return SimpleNamespace(pack=ops.small_rows_pack, linear=ops.small_rows_linear)


def swap_key_contributions() -> Callable[..., None] | None:
    """The exact level's swap of old for new key contributions, built on first use; None if
    unavailable. Arguments, float32: numerator (G, H, L, dh), denominator and shift (G, H, L),
    contiguous and updated in place; q (G, H, L, dh), any strides but a contiguous last
    dimension; new and old keys and values (G, H, m, dh) and the columns' bias (G, H, L, m) or
    None, contiguous."""
    return torch.ops.eventful.swap_key_contributions if _available() else None


def gate_error_norms() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """Per token, the L2 norm of current - reference (B, N, D), contiguous float32, as (B, N),
    built on first use; None if unavailable."""
    return torch.ops.eventful.gate_error_norms if _available() else None


def unprocessed_share() -> Callable[..., torch.Tensor] | None:
    """A gate's unprocessed share per stream (B,): error norms (B, N) contiguous float32, the
    selected tokens' flat indices (M,) int64, the gate's scale (B,) float32; the norms of the
    tokens left out, summed in token order, over max(scale, FLT_MIN) N. Built on first use; None
    if unavailable."""
    return torch.ops.eventful.unprocessed_share if _available() else None


def attention_rows() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """Softmax attention of query rows over every key and each row's log-sum-exp, built on first
    use; None if unavailable. Arguments, float32, any strides but a contiguous last dimension:
    q (G, H, Nq, dh), k and v (G, H, L, dh), bias (G, H, Nq, L) added to the logits, or None.
    Returns the output (G, H, Nq, dh), laid out as (G, Nq, H, dh), and the log-sum-exp
    (G, H, Nq)."""
    return torch.ops.eventful.attention_rows if _available() else None


def transposed() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x (B, R, C), float32, any strides but a contiguous last dimension -> (B, C, R), contiguous,
    built on first use; None if unavailable."""
    return torch.ops.eventful.transposed if _available() else None


def head_stage() -> Callable[..., tuple] | None:
    """A sparse stage of an eventful head after its product (`LocalStack._sparse_stage`), built
    on first use; None if unavailable. Arguments: the changed input positions (m,) int64, their
    contributions (m, kernel elements x C) float32 or bfloat16, the stage's cached
    pre-activation and output (positions, C) float32, updated in place, per pointwise layer its
    batch norm's scale and shift (or None and None: a ReLU), whether a batch norm rounds once (a
    fused multiply-add, as PyTorch's `addcmul` does on CPUs with AVX2), whether the convolution
    is transposed, its kernel size, stride, padding and dilation, the input's and the output's
    (rows, columns). Returns the output positions that changed, their changes, and (2,) the
    contributions added and the positions touched."""
    return torch.ops.eventful.head_stage if _available() else None


def head_pointwise() -> Callable[..., None] | None:
    """The pointwise layers of a dense stage of an eventful head in one pass
    (`LocalStack._pointwise_into_cache`), built on first use; None if unavailable. Arguments:
    the stage's convolution output as rows (positions, C) float32 or bfloat16, contiguous; the
    cached pre-activation (positions, C) float32 to widen them into, or None; the cached output
    (positions, C) float32 to write; per pointwise layer its batch norm's scale and shift (or
    None and None: a ReLU) and whether a batch norm rounds once, as `head_stage` takes them."""
    return torch.ops.eventful.head_pointwise if _available() else None


def head_rows_product() -> Callable[..., None] | None:
    """A 1x1 convolution recomputed at some positions of its output kept as rows
    (`LocalStack._without_own_changes`), built on first use; None if unavailable. Arguments: the
    input as rows (P, C), the positions (M,) int64, the weight (O, C), the bias (O,) or None and
    the kept output (P, O) written at those positions; float32, contiguous. Each output is one
    sum over the channels in a fixed order, then the bias."""
    return torch.ops.eventful.head_rows_product if _available() else None


def head_input_change() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """What a step of an eventful head passes on from its input (`LocalStack._input_change`),
    built on first use; None if unavailable. Arguments: the input as rows (P, C) and the cached
    input (P, C), float32, contiguous, the cached one updated in place; per stream the count of
    positions of largest change to take (`topk`, in its order, those with a change), or an
    empty list for every changed position in order. Returns the flat positions (M,) int64 and
    their deltas (M, C)."""
    return torch.ops.eventful.head_input_change if _available() else None


def exact_attention_update() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """One step of the exact level's attention over each stream's whole sequence (no bias),
    built on first use; None if unavailable. Arguments: the qkv buffer (B, N, 3 D), the
    selected tokens' new qkv rows (M, 3 D) and their flat indices (M,) stream by stream (int64),
    the running sums: numerator (B, H, N, dh), denominator and shift (B, H, N), all float32 and
    contiguous, updated in place; the heads; the fewest changed tokens from which a stream
    recomputes every row; the denominator below which a row is recomputed. Returns the attention
    output (B, N, D) and per stream (B,) the underflowed rows recomputed."""
    return torch.ops.eventful.exact_attention_update if _available() else None


def bfloat16_attention() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """Softmax attention of every query row over every key in bfloat16 on AMX tiles, built on
    first use; None where unavailable (no build, or a CPU or process without AMX-BF16 tiles).
    Arguments: q, k, v (G, H, N, 64) bfloat16 with contiguous features, the scale folded into
    q. Returns the output (G, H, N, 64) in float32, its heads side by side in memory, and each
    row's log-sum-exp (G, H, N)."""
    return torch.ops.eventful.bfloat16_attention if _tiles_available() else None


def tiles_linear() -> SimpleNamespace | None:
    """The linear layer in bfloat16 on AMX tiles (`pack`, `linear`), built on first use; None
    where unavailable (no build, or a CPU or process without AMX-BF16 tiles). `pack(weight)`
    lays a float32 (out, in) weight out as the tiles read it, rounded to bfloat16;
    `linear(x, panels, bias, out, activation)` takes float32 rows (M, in) and returns float32
    (M, out), the bias and the activation ("none" or "gelu", the exact GELU) in float32."""
    return _tiles_operators() if _tiles_available() else None


@functools.cache
def _tiles_operators() -> SimpleNamespace:
    ops = torch.ops.eventful
    return SimpleNamespace(pack=ops.tiles_pack, linear=ops.tiles_linear)


def _tiles_available() -> bool:
    """Whether the build has the AMX kernels and the process may use the tiles: asked of the
    library once, as the bfloat16 layers ask at every call."""
    return _available() and _tiles_granted()


@functools.cache
def _tiles_granted() -> bool:
    return bool(torch.ops.eventful.tiles_available())


@functools.cache
def bfloat16_attention_pays(tokens: int, head_features: int) -> bool:
    """Whether `bfloat16_attention` runs for sequences of `tokens` and heads of `head_features`:
    where it is available, and faster there than PyTorch's fused attention (the kernel's rule,
    which the one-call block step follows too)."""
    return _available() and bool(torch.ops.eventful.bfloat16_attention_pays(tokens, head_features))


def full_attention_update() -> Callable[..., torch.Tensor] | None:
    """One step of the full level's attention update without a bias
    (`attention.update_full_groups`), built on first use; None if unavailable. Arguments,
    float32 and contiguous unless said: the caches, updated in place: product (G, H, L, dh),
    reference (G, H, L, L) key-major, denominator and shift (G, H, L); q, k, v (G, H, L, dh)
    holding the new rows, any strides but a contiguous last dimension; old keys and values
    (G, H, m, dh); the changed positions index (G, m) int64 and valid (G, m) bool; the
    denominator below which a row's log-sum-exp is recomputed; whether every row's log-sum-exp
    is recomputed. Returns per group (G,) the underflowed rows recomputed."""
    return torch.ops.eventful.full_attention_update if _available() else None


def commit_rows() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """current (B, N, D), reference (B, N, D), index (M,) flat token indices (int64) -> the rows
    (M, D) of current there, which the reference takes; float32, contiguous. Built on first
    use; None if unavailable."""
    return torch.ops.eventful.commit_rows if _available() else None


def add_rows() -> Callable[..., torch.Tensor] | None:
    """x (B, N, D), buffer (B, N, D), index (M,) flat token indices (int64), rows (M, D) -> x +
    buffer after the buffer takes the rows there; float32, contiguous. Built on first use; None
    if unavailable."""
    return torch.ops.eventful.add_rows if _available() else None


def block_step() -> Callable[..., tuple] | None:
    """A block's lean step in one call (`EventfulBlock._one_call_step`), built on first use;
    None if unavailable. Arguments: x (B, N, D); the block's state, updated in place: the three
    gates' references and the qkv, proj and mlp buffers, interleaved (`block.STEP_STATE`), then
    the running sums of `exact_attention_update` (numerator, denominator, shift) at the exact
    level or three None at the tokenwise level, whose qkv buffer is float32 (attention on
    `attention_rows`) or bfloat16 (PyTorch's fused attention in bfloat16); the gates' scales
    (B,); each LayerNorm's weight, bias (or None) and eps; per linear layer (qkv, proj, fc1
    with an exact GELU, fc2) its small-rows panels, bias (or None) and panel scale (int8
    panels, else None); fc1's width; the tokens per stream; the heads;
    `exact_attention_update`'s `dense_from` and `underflow`; whether to measure the gates'
    unprocessed shares. Returns the output (B, N, D), per stream (B,) the underflowed rows
    recomputed (zeros at the tokenwise level), and per gate (qkv, proj, mlp) its token indices
    (B, count), its rows (B count, D) and its unprocessed share (B,) or None."""
    return torch.ops.eventful.block_step if _available() else None


def blocks_step() -> Callable[..., tuple] | None:
    """Consecutive blocks' lean steps in one call (`block.steps_in_one_call`): each
    block's `block_step`, its output the next one's input. Arguments: x (B, N, D); per block, one
    after another, its 28 tensors in `block_step`'s order (x left out; None where optional), its
    two LayerNorms' eps, and its integers (fc1's width, the tokens per stream, the heads,
    `dense_from`, 1 where attention runs in bfloat16); the blocks (numbered from 1) whose outputs
    to return; `underflow`; whether to measure. Returns the last output, the tapped outputs and,
    where measured, per block its lost rows and nine gate tensors (`block_step`'s); built on
    first use, None if unavailable."""
    return torch.ops.eventful.blocks_step if _available() else None


def can_take(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may take these tensors: float32 on the CPU, none recording gradients
    (the kernels have no backward), outside `torch.compile` (which traces PyTorch's own
    operators). Each caller checks the layout its kernel reads. (Written as loops: a step asks
    this some 150 times.)"""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if not t.is_cpu or t.dtype != torch.float32 or (grad and t.requires_grad):
            return False
    return not torch.compiler.is_compiling()


def _available() -> bool:
    """Whether the library is built and loaded (building it on the first call, unless
    `EVENTFUL_CPU_KERNELS=0`, which is read then)."""
    if NAME in _loaded:  # every call after the first: no lock
        return _loaded[NAME]
    with _lock:
        if NAME not in _loaded:
            disabled = os.environ.get(DISABLE, "1") == "0"
            _loaded[NAME] = not disabled and _build(NAME, SOURCES) is not None
        return _loaded[NAME]


def _cpu_signature() -> str:
    """A short hash of this CPU's model name and feature flags (Linux), else of the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
        identity = "\n".join(sorted(set(lines)))
    except OSError:
        identity = platform.processor() or platform.machine()
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def _build(name: str, sources: list[Path]) -> ModuleType | None:
    from torch.utils import cpp_extension

    full_name = f"eventful_{name}_{_cpu_signature()}"
    built = Path(cpp_extension._get_build_directory(full_name, verbose=False))
    # A failed build of these sources is remembered beside it, so that later processes (each
    # command, each worker) fall back at once instead of warning again; delete it to retry.
    texts = [path.read_bytes() for path in [*sources, *HEADERS]]
    digest = hashlib.sha256(b"".join(texts)).hexdigest()
    failed = built / f"failed-{digest[:12]}.txt"
    if failed.exists():
        return None
    try:
        if not (built / f"{full_name}.so").exists():
            print(
                f"eventful: building its CPU kernels for this machine, once "
                f"(one to two minutes; cached in {built.parent})",
                file=sys.stderr,
                flush=True,
            )
        return cpp_extension.load(
            full_name,
            [str(source) for source in sources],
            # PyTorch rebuilds when the sources or these flags change, not the headers: their
            # digest in a flag (unused by the code) makes a changed header rebuild too.
            extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DEVENTFUL_DIGEST={digest[:16]}"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: PyTorch's kernels do
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        try:
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{type(error).__name__}: {reason}\n")
        except OSError:
            pass  # nowhere to remember it: the next process tries again
        warnings.warn(
            f"eventful could not build its CPU kernels ({type(error).__name__}: "
            f"{reason}); using PyTorch's kernels instead (remembered in {failed}; delete it to "
            f"try again, or set {DISABLE}=0 to skip the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
