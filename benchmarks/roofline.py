"""Where a step's time goes against this machine's roofline, and the fixed cost of a step.

Part "roofline": the machine's measured peak multiply-add rate (a 2048 x 2048 matmul, float32
by torch.mm or the engine's packed linear layer, whichever is faster, bfloat16, and int8 by
torch._int_mm; the fastest of several runs) and memory bandwidth (a 256 MB copy, likewise);
then, for ViT-S/14 at 224 and ViT-B/16 at 384, tokenwise and exact, k = N/4 and N/16, each
part of a step (torch profiler, self CPU time) in milliseconds beside the least time this
machine needs for it: max(flops / peak, bytes / bandwidth) from the step's own op counts and
the bytes it must read.

Part "fixed-cost": time per step against k (N down to N/64), interleaved with the dense model
on the same real frames, fitted as `a + b k` (least squares over the k below N); `a` over a
dense step is the share no policy can remove. Where the CPU multiplies bfloat16 natively, also
at precision bf16 against the dense model cast to bfloat16.

    python benchmarks/roofline.py --threads 2 --write
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from report import markdown_table, write_or_print
from speed import TURN, Timings, interleaved, real_frames
from user_sizes import ATTENTION_OPERATORS, GATE_OPERATORS, LINEAR_OPERATORS, operator_profile

import eventful
from eventful.core import kernels, packed_linear
from eventful.core.ops import HEAD_LAYERS
from eventful.core.packed_linear import PackedLinear
from eventful.core.precision import native_bf16, quantized

LEVELS = ("tokenwise", "exact")
FLOAT = 4  # bytes

# Parts of a step, by the operator names the profiler reports; the rest is "other operators".
PARTS = {
    "linear layers": LINEAR_OPERATORS,
    "attention": (
        *ATTENTION_OPERATORS,
        "aten::exp_",
        "aten::amax",
        "aten::neg_",
        "aten::addcmul_",
        "aten::mul_",
        "aten::maximum",
    ),
    "gathers and scatters": (
        "eventful::commit_rows",
        "eventful::add_rows",
        "aten::add",
        "aten::index_select",
        "aten::index_copy_",
        "aten::gather",
        "aten::scatter_",
        "aten::copy_",
        "aten::cat",
    ),
    "gates (error, norm, selection)": GATE_OPERATORS,
    "norms and activations": ("aten::native_layer_norm", "aten::gelu"),
    "patch embedding": ("aten::mkldnn_convolution",),
}


def models() -> dict[str, tuple[Callable[[], eventful.ViT], int]]:
    def vit(patch: int, dim: int, heads: int, size: int) -> Callable[[], eventful.ViT]:
        def build() -> eventful.ViT:
            torch.manual_seed(0)
            return eventful.ViT(
                image_size=size, patch_size=patch, dim=dim, depth=12, heads=heads
            ).eval()

        return build

    return {
        "ViT-S/14 @ 224": (vit(14, 384, 6, 224), 224),
        "ViT-B/16 @ 224": (vit(16, 768, 12, 224), 224),
        "ViT-B/16 @ 384": (vit(16, 768, 12, 384), 384),
    }


def best_seconds(call: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls: a peak is what the machine reaches when nothing else
    runs, and on a shared machine that is the least time, not the typical one."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_peaks() -> dict[str, float]:
    """Peak multiply-add rates (FLOP/s, a multiply-add counted as 2) and copy bandwidth (B/s,
    bytes read plus written)."""
    size = 2048
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        repeats = 7 if dtype == torch.float32 else 1  # bfloat16 may be emulated: slow
        seconds = best_seconds(lambda a=a, b=b: a @ b, repeats)
        if dtype == torch.float32:  # the engine's own kernel may reach more than torch.mm
            linear = PackedLinear(size, size, bias=False)
            with torch.no_grad():
                linear(a)
                seconds = min(seconds, best_seconds(lambda a=a, f=linear: f(a), repeats))
        peaks[str(dtype)] = 2 * size**3 / seconds
    a, b = (torch.randint(-127, 128, (size, size), dtype=torch.int8) for _ in range(2))
    try:  # int8 products summed in int32 (VNNI or AMX where the CPU has them)
        torch._int_mm(a, b)
        peaks[str(torch.int8)] = 2 * size**3 / best_seconds(lambda: torch._int_mm(a, b), 7)
    except (RuntimeError, AttributeError):  # no int8 matmul on this CPU or torch
        peaks[str(torch.int8)] = float("nan")
    source = torch.ones(64 * 2**20)  # 256 MB
    target = torch.empty_like(source)
    target.copy_(source)
    copy_seconds = best_seconds(lambda: target.copy_(source), 9)
    peaks["bandwidth"] = 2 * source.numel() * FLOAT / copy_seconds
    return peaks


def cpu_flags() -> str:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    found = [flag for flag in wanted if f" {flag}" in text]
    return ", ".join(found) or "none of " + ", ".join(wanted)


# Bytes per weight of the linear layers at each precision.
WEIGHT_BYTES = {"fp32": FLOAT, "bf16": 2, "int8": 1}


def least_times(
    model, stream, num_tokens: int, peaks: dict[str, float], precision: str = "fp32"
) -> dict[str, float]:
    """Milliseconds each part needs at least on this machine, from the last step's op counts.
    At precision bf16 the linear layers read bfloat16 weights and, with attention and a head,
    multiply at the bfloat16 peak; what later steps read stays float32, as the engine keeps it.
    A model with a head (the saliency decoder) adds it: its multiply-accumulates, or its
    convolution and linear weights read once."""
    flops, bandwidth = peaks[str(torch.float32)], peaks["bandwidth"]
    matmul_flops = peaks[str(torch.bfloat16)] if precision == "bf16" else flops
    ops = stream.ops.by_category
    encoder = model.encoder
    dim = encoder.blocks[0].dim
    linear_bytes = sum(
        WEIGHT_BYTES[precision] * layer.weight.numel() + FLOAT * layer.bias.numel()
        for block in encoder.blocks
        for layer in (block.qkv, block.proj, block.fc1, block.fc2)
    )
    tokens_bytes = FLOAT * num_tokens * dim  # one pass over a stream's (N, D) tokens
    depth = len(encoder.blocks)
    patch = encoder.embedding.patch_size
    rows = stream.trace.blocks
    selected = sum(sum(gate.counts) for block in rows for gate in block.values())
    return {
        "linear layers": 1000 * max(2 * ops["linear"] / matmul_flops, linear_bytes / bandwidth),
        # The qkv buffer read once per block (B, N, 3 D).
        "attention": 1000
        * max(2 * ops["attention"] / matmul_flops, depth * 3 * tokens_bytes / bandwidth),
        # The gates' references and the buffers take the selected rows; each of a block's two
        # residual additions reads x and a buffer and writes their sum.
        "gathers and scatters": 1000
        * (FLOAT * selected * dim * 3 + depth * 2 * 3 * tokens_bytes)
        / bandwidth,
        "gates (error, norm, selection)": 1000 * depth * 3 * 2 * tokens_bytes / bandwidth,
        "norms and activations": 1000 * FLOAT * selected * dim * 2 / bandwidth,
        "patch embedding": 1000 * 2 * 3 * num_tokens * dim * patch**2 / flops,
        "head": 1000
        * max(2 * ops["head"] / matmul_flops, head_weight_bytes(model, precision) / bandwidth),
        "other operators": 0.0,
    }


def head_weight_bytes(model, precision: str) -> int:
    """Bytes of the weights of a model's layers outside its encoder (a head's convolutions and
    linear layers), at the precision's weight size; 0 for a bare encoder."""
    inside = {id(module) for module in model.encoder.modules()}
    return sum(
        WEIGHT_BYTES[precision] * module.weight.numel()
        for module in model.modules()
        if id(module) not in inside and isinstance(module, HEAD_LAYERS)
    )


def roofline_section(threads: int, steps: int) -> str:
    peaks = machine_peaks()
    machine_rows = [
        ["float32 matmul, 2048 x 2048", f"{peaks[str(torch.float32)] / 1e9:.1f} GFLOP/s"],
        ["bfloat16 matmul, 2048 x 2048", f"{peaks[str(torch.bfloat16)] / 1e9:.1f} GFLOP/s"],
        ["int8 matmul (torch._int_mm), 2048 x 2048", f"{peaks[str(torch.int8)] / 1e9:.1f} GOP/s"],
        ["copy, 256 MB (read + write)", f"{peaks['bandwidth'] / 1e9:.1f} GB/s"],
        ["CPU features", cpu_flags()],
    ]
    tables = []
    for name in ("ViT-S/14 @ 224", "ViT-B/16 @ 384"):
        build, size = models()[name]
        vit = build()
        num_tokens = vit.embedding.num_tokens(size, size)
        frames = real_frames(size, steps, 1)
        columns, floors = {}, {}
        for level in LEVELS:
            for divisor in (4, 16):
                k = round(num_tokens / divisor)
                model = eventful.convert(vit, policy=eventful.TopK(k), level=level)
                stream = model.stream(drift=None, check_finite=False)
                label = f"{level}, k = N/{divisor}"
                parts = operator_profile(stream, frames, PARTS, "other operators")
                wall = Timings()
                for frame in frames:
                    wall.add(stream, frame)
                parts["step, unprofiled"] = wall.summary()[0]
                columns[label] = parts
                floors[label] = least_times(model, stream, num_tokens, peaks)
                print(name, label, {part: round(ms, 1) for part, ms in parts.items()}, flush=True)
        header = ["part", *(f"{label}: ms (least)" for label in columns)]
        table = []
        for part in [*PARTS, "other operators"]:
            table.append(
                [
                    part,
                    *(
                        f"{columns[label][part]:.1f} ({floors[label][part]:.2f})"
                        for label in columns
                    ),
                ]
            )
        table.append(
            [
                "all operators (step, unprofiled)",
                *(
                    f"{sum(v for p, v in columns[label].items() if p in floors[label]):.1f} "
                    f"({columns[label]['step, unprofiled']:.1f}; least "
                    f"{sum(floors[label].values()):.2f})"
                    for label in columns
                ),
            ]
        )
        tables.append(
            f"#### {name} ({num_tokens} tokens), batch 1\n\n" + markdown_table(header, table)
        )
    return (
        "### Roofline: each part of a step against this machine's limits\n\n"
        f"{threads} threads. This machine:\n\n"
        + markdown_table(["measure", "value"], machine_rows)
        + "\n\nPer part of a step: milliseconds per step under the torch profiler (self CPU "
        f"time, the profiler's own cost included; {steps - 2} steps after two, real frames, "
        "random weights, no drift control), and in brackets the least time this machine needs "
        "for that part: max(2 x multiply-adds / float32 peak, bytes / bandwidth), the "
        "multiply-adds from the step's op counts, the bytes those the part must read at least "
        "(all linear weights once; each gate's input and reference; the selected rows; the "
        "residual additions' passes over the tokens). Where the engine fuses work into one "
        "kernel, the kernel's part holds it: the layer norms before the qkv projection and the "
        "MLP run inside the gathers (`eventful::commit_rows`), the GELU inside the linear "
        "layers on few rows, and the exact level's whole update inside attention "
        "(`eventful::exact_attention_update`). The profiled steps call each kernel from "
        "Python; the unprofiled ones run a block's step in one call of them all "
        "(`eventful::block_step`), as a stream does. "
        '"Other operators" (index arithmetic, selection bookkeeping, views, allocation) need '
        "no time at all on the roofline. The last row adds the profiled parts and gives the "
        "step's median wall time without the profiler; the gap between the two is the "
        "profiler's own cost, and the wall time less the least time is what Python, dispatch "
        "and kernels far from their limits still take.\n\n" + "\n\n".join(tables)
    )


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares a, b of ms = a + b k."""
    ks, ms = [k for k, _ in points], [m for _, m in points]
    mean_k, mean_m = statistics.fmean(ks), statistics.fmean(ms)
    slope = sum((k - mean_k) * (m - mean_m) for k, m in points) / sum((k - mean_k) ** 2 for k in ks)
    return mean_m - slope * mean_k, slope


def least_step_ms(
    model, frames, num_tokens: int, peaks: dict[str, float], precision: str = "fp32"
) -> float:
    """The least milliseconds this machine needs for a step of `model` (`least_times`, all
    parts), from a counting stream's second step."""
    stream = model.stream(drift=None, check_finite=False)
    with torch.inference_mode():
        for frame in frames[:2]:
            stream(frame)
    return sum(least_times(model, stream, num_tokens, peaks, precision).values())


def fixed_cost_section(threads: int, steps: int) -> str:
    divisors = (1, 4, 16, 64)
    precisions = ["fp32", *(["bf16"] if native_bf16() else [])]
    header = ["model", "level", "precision", "dense ms", *(f"k = N/{d}" for d in divisors)]
    header += ["a / dense", "b ms", "least a / dense"]
    peaks = machine_peaks()
    rows = []
    for name, (build, size) in models().items():
        vit = build()
        num_tokens = vit.embedding.num_tokens(size, size)
        frames = real_frames(size, steps, 1)
        for precision in precisions:
            # The dense model at the same precision: what a user would otherwise run.
            dense_model = vit if precision == "fp32" else copy.deepcopy(vit).to(torch.bfloat16)
            cast = torch.float32 if precision == "fp32" else torch.bfloat16

            def run_dense(frame, dense_model=dense_model, cast=cast):
                return dense_model(frame.to(cast))

            for level in LEVELS:
                dense, ratios, points, least_points = [], [], [], []
                for divisor in divisors:
                    k = max(1, round(num_tokens / divisor))
                    model = eventful.convert(
                        vit, policy=eventful.TopK(k), level=level, precision=precision
                    )
                    stream = model.stream(drift=None, check_finite=False, count_ops=False)
                    medians = interleaved({"dense": run_dense, "eventful": stream}, frames)
                    dense.append(medians["dense"])
                    ms = medians["eventful"]
                    ratios.append(ms)
                    if divisor > 1:
                        points.append((k, ms))
                        least = least_step_ms(model, frames, num_tokens, peaks, precision)
                        least_points.append((k, least))
                dense_ms = statistics.median(dense)
                a, b = fit(points)
                cells = [f"{ms:.1f} ({ms / dense_ms:.2f})" for ms in ratios]
                least_a = f"{fit(least_points)[0] / dense_ms:.2f}"
                fitted = [f"{a / dense_ms:.2f}", f"{b:.3f}", least_a]
                rows.append([name, level, precision, f"{dense_ms:.1f}", *cells, *fitted])
                print(*rows[-1], sep=" | ", flush=True)
    return (
        "### The fixed cost of a step (CPU, batch 1)\n\n"
        f"{threads} threads, {steps} steps per k, each interleaved with the dense model at the "
        f"same precision on the same real frames (bikes.mp4) in turns of {TURN} frames (which "
        "goes first alternates), medians over the steps after the first of each turn (dense: "
        "the median of its runs beside each k); random weights, TopK(k), no drift control, no "
        "op counting. Precision bf16 (where the CPU multiplies bfloat16 natively): the engine "
        "converted with `precision='bf16'`, "
        "against the dense model cast to bfloat16 (`model.to(torch.bfloat16)`). Each cell: "
        "milliseconds per step (over a dense step). Fit: ms = a + b k over k = N/4, N/16, N/64; "
        "a / dense is the share of a dense step that no policy removes. Least a / dense: the "
        "same fit of the least time this machine needs for the step at each k (section "
        "roofline: max(multiply-adds / float32 peak, bytes / bandwidth) per part, from the "
        "step's op counts), over the measured dense step: the fixed cost that no implementation "
        "removes on this machine. At precision bf16 the least times take the linear layers' "
        "weights at 2 bytes and their products and attention's at the bfloat16 peak, and what "
        "later steps read (gate references, token buffers, the exact level's sums) in float32, "
        "as the engine keeps it so that rounding does not build up over a stream. Target "
        "(issue 25): a at most 0.10 of a dense step, and time falling with k down to N/64.\n\n"
        + markdown_table(header, rows)
    )


def read_bandwidth() -> float:
    """Bytes per second of reading 256 MB once (a sum): what a weight-bound layer streams."""
    source = torch.ones(64 * 2**20)
    source.sum()
    return source.numel() * FLOAT / best_seconds(source.sum, 9)


def onednn_rows(x: torch.Tensor, layers: list[PackedLinear]) -> None:
    for layer in layers:
        torch.ops.mkldnn._linear_pointwise(x, layer._packed_weight(), layer.bias, "none", [], "")


def kernel_rows(kernel, x: torch.Tensor, layers: list[PackedLinear], panels) -> None:
    for layer, (panel, scale) in zip(layers, panels, strict=True):
        kernel.linear(x, panel, layer.bias, layer.out_features, scale)


def small_rows_section(threads: int, repeats: int) -> str:
    """The linear layers of ViT-S and ViT-B on 1 to `SMALL_ROWS` rows: oneDNN's prepacked
    linear against the engine's small-rows kernel with float32 and with int8 weights
    (`precision="int8"`), beside the least time of each. Enough copies of each layer that their
    weights do not fit in the caches, as in a step, which reads every block's."""
    peaks, read = machine_peaks(), read_bandwidth()
    shapes = ((384, 1152), (384, 384), (384, 1536), (1536, 384), (768, 2304), (768, 3072))
    shapes += ((3072, 768),)
    row_counts = (1, 4, 16, 32, 64, 128, 256, packed_linear.SMALL_ROWS)
    header = [
        "layer (in -> out)",
        *(f"{rows} rows: oneDNN / ours / ours int8 (least / int8) us" for rows in row_counts),
    ]
    table = []
    kernel = kernels.small_rows_linear()
    for features, outputs in shapes:
        copies = max(2, (256 * 2**20) // (features * outputs * FLOAT))
        layers = [PackedLinear(features, outputs) for _ in range(copies)]
        with torch.inference_mode():
            panels = [(kernel.pack(layer.weight), None) for layer in layers] if kernel else []
            int8_panels = []
            for layer in layers if kernel else []:
                rounded, scale = quantized(layer.weight, "int8")
                int8_panels.append((kernel.pack(rounded, scale), scale))
        cells = []
        for rows in row_counts:
            x = torch.randn(rows, features)
            timings = {"onednn": [], "ours": [], "int8": []}
            with torch.inference_mode():
                onednn_rows(x, layers)  # packs each layer's weight once
                calls = {
                    "onednn": (onednn_rows, (x, layers)),
                    "ours": (kernel_rows, (kernel, x, layers, panels)),
                    "int8": (kernel_rows, (kernel, x, layers, int8_panels)),
                }
                for index in range(repeats):
                    names = list(calls) if index % 2 == 0 else list(calls)[::-1]
                    for name in names if kernel else ("onednn",):
                        start = time.perf_counter()
                        call, arguments = calls[name]
                        call(*arguments)
                        timings[name].append((time.perf_counter() - start) / copies * 1e6)
            compute = 2 * rows * features * outputs / peaks[str(torch.float32)]
            least = max(compute, features * outputs * FLOAT / read) * 1e6
            least_int8 = max(compute, features * outputs / read) * 1e6
            ours = "not built"
            if kernel:
                medians = [statistics.median(timings[name]) for name in ("ours", "int8")]
                ours = " / ".join(f"{value:.0f}" for value in medians)
            cells.append(
                f"{statistics.median(timings['onednn']):.0f} / {ours} "
                f"({least:.0f} / {least_int8:.0f})"
            )
        table.append([f"{features} -> {outputs}", *cells])
        print(*table[-1], sep=" | ", flush=True)
    return (
        "### Linear layers on few rows: oneDNN against the engine's small-rows kernel\n\n"
        f"{threads} threads; microseconds per call, the median of {repeats} interleaved rounds "
        "over enough copies of each layer (fresh weights) to fill 256 MB, so that weights come "
        "from memory as in a step. Ours: the kernel with float32 weights, then with int8 "
        "weights (`precision='int8'`: a quarter of the bytes, widened to float32 as loaded). "
        "In brackets the least time: max(2 x multiply-adds / float32 "
        f"peak, weight bytes / read bandwidth), for float32 and int8 weights, with the peak "
        f"{peaks[str(torch.float32)] / 1e9:.0f} GFLOP/s and reading at {read / 1e9:.1f} GB/s. "
        "The engine runs its kernel (`eventful.core.kernels`) up to "
        f"{packed_linear.SMALL_ROWS} rows and oneDNN above.\n\n" + markdown_table(header, table)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parts = ("roofline", "fixed-cost", "small-rows-linear", "all")
    parser.add_argument("--part", choices=parts, default="all")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("roofline", "all"):
        write_or_print("roofline", roofline_section(args.threads, args.steps), args.write)
    if args.part in ("fixed-cost", "all"):
        write_or_print("fixed-cost", fixed_cost_section(args.threads, args.steps), args.write)
    if args.part in ("small-rows-linear", "all"):
        section = small_rows_section(args.threads, args.steps)
        write_or_print("small-rows-linear", section, args.write)


if __name__ == "__main__":
    main()
