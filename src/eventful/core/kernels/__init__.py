"""CPU kernels of our own, built on this machine the first time they are needed.

`small_rows_linear()` builds `small_rows_linear.cpp` (a linear layer on the few rows an eventful
step selects) and returns its two operators, `pack` and `linear`
(`torch.ops.eventful.small_rows_pack` and `small_rows_linear`, which profilers list by those
names), or None where it cannot be built: no C++ compiler, or `EVENTFUL_CPU_KERNELS=0` in the
environment. Callers then use PyTorch's own kernels, with the same results up to rounding.

The build (about a minute, once) goes through `torch.utils.cpp_extension`, for this CPU's
instruction set (`-march=native`), and is cached under `TORCH_EXTENSIONS_DIR` (default
`~/.cache/torch_extensions`) under a name that includes the CPU's model and features, so that a
cache shared between machines never hands one CPU the other's build. A build prints one line to
stderr when it starts; a failed build warns once and is remembered in the cache (a file beside
the build), so that later processes fall back without trying again.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

SOURCE = Path(__file__).with_name("small_rows_linear.cpp")
DISABLE = "EVENTFUL_CPU_KERNELS"

_lock = threading.Lock()
_loaded: dict[str, SimpleNamespace | None] = {}


def small_rows_linear() -> SimpleNamespace | None:
    """The small-rows linear kernel (`pack`, `linear`), built on first use; None if unavailable."""
    if os.environ.get(DISABLE, "1") == "0":
        return None
    if "small_rows_linear" in _loaded:  # every call after the first: no lock
        return _loaded["small_rows_linear"]
    with _lock:
        if "small_rows_linear" not in _loaded:
            built = _build("small_rows_linear", SOURCE)
            operators = None
            if built is not None:
                ops = torch.ops.eventful
                operators = SimpleNamespace(pack=ops.small_rows_pack, linear=ops.small_rows_linear)
            _loaded["small_rows_linear"] = operators
        return _loaded["small_rows_linear"]


def _cpu_signature() -> str:
    """A short hash of this CPU's model name and feature flags (Linux), else of the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
        identity = "\n".join(sorted(set(lines)))
    except OSError:
        identity = platform.processor() or platform.machine()
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def _build(name: str, source: Path) -> ModuleType | None:
    from torch.utils import cpp_extension

    full_name = f"eventful_{name}_{_cpu_signature()}"
    built = Path(cpp_extension._get_build_directory(full_name, verbose=False))
    # A failed build of this source is remembered beside it, so that later processes (each
    # command, each worker) fall back at once instead of warning again; delete it to retry.
    failed = built / f"failed-{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}.txt"
    if failed.exists():
        return None
    try:
        if not (built / f"{full_name}.so").exists():
            print(
                f"eventful: building its CPU kernel {name} for this machine, once "
                f"(about a minute; cached in {built.parent})",
                file=sys.stderr,
                flush=True,
            )
        return cpp_extension.load(
            full_name,
            [str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
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
            f"eventful could not build its CPU kernel {name} ({type(error).__name__}: "
            f"{reason}); using PyTorch's kernels instead (remembered in {failed}; delete it to "
            f"try again, or set {DISABLE}=0 to skip the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
