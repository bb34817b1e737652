"""Wall-clock speed at the sizes users run: small and base ViTs at 224 and 448, the backbone alone
and the DINOv2 saliency model end to end (backbone and decoder), batch 1, CPU threads pinned.

For each subject, every level and k = N (every token: the engine's fixed cost), N/2, N/4, N/8
runs against the dense model on the same real frames (bikes.mp4, letterboxed), interleaved step
by step (which of the pair runs first alternates), one variant's caches alive at a time; figures
are medians over the steps after the first. The streams count ops (as `eventful run` does) and
run without drift control, so that every timed step is an eventful one. Then, for ViT-S/14 at
224 and k = N/4, where the time of one step goes, by kind of operator (torch profiler, self CPU
time). Writes the `user-sizes` section of BENCHMARKS.md.

    python benchmarks/user_sizes.py --threads 2 --steps 12 --write
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from report import markdown_table, write_or_print
from speed import Timings, dinov2_s14, real_frames, vit_b16
from torch.profiler import ProfilerActivity, profile

import eventful
from eventful.core import block
from eventful.core.block import LEVELS
from eventful.core.packed_linear import SMALL_ROWS
from eventful.models.imgfocus import imgfocus_saliency

FRACTIONS = (1.0, 0.5, 0.25, 0.125)  # 1.0: every token, the engine's fixed cost

# Operators by the name the profiler gives them: the linear layers, attention and a gate's work,
# which section roofline counts the same way (attention with the PyTorch path's pieces too).
LINEAR_OPERATORS = (
    "mkldnn::_linear_pointwise",
    "eventful::small_rows_linear",
    "aten::addmm",
    "aten::mm",
    "aten::linear",
)
ATTENTION_OPERATORS = (
    "eventful::attention_rows",
    "eventful::swap_key_contributions",
    "eventful::exact_attention_update",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::bmm",
    "aten::exp",
)
GATE_OPERATORS = (
    "eventful::gate_error_norms",
    "aten::sub",
    "aten::linalg_vector_norm",
    "aten::topk",
)

# Kinds of operator; the rest is "other".
KINDS = {
    "linear layers": LINEAR_OPERATORS,
    "attention": ATTENTION_OPERATORS,
    "gathers and scatters": (
        "eventful::commit_rows",
        "eventful::add_rows",
        "aten::index_select",
        "aten::index_copy_",
        "aten::copy_",
        "aten::index",
    ),
    "gate errors and selection": GATE_OPERATORS,
    "norms and GELU": ("aten::native_layer_norm", "aten::gelu"),
}


def subjects() -> dict[str, Callable[[], tuple[torch.nn.Module, int, int]]]:
    """Per name: the dense model, its input size and its token count."""

    def backbone(make, size):
        def build():
            model = make(size).ours
            return model, size, model.embedding.num_tokens(size, size)

        return build

    def saliency(size):
        def build():
            model = imgfocus_saliency().eval()
            return model, size, model.backbone.embedding.num_tokens(size, size)

        return build

    return {
        "ViT-S/14 @ 224 (DINOv2 backbone)": backbone(dinov2_s14, 224),
        "ViT-S/14 @ 448 (DINOv2 backbone)": backbone(dinov2_s14, 448),
        "ViT-B/16 @ 224 (random weights)": backbone(vit_b16, 224),
        "ViT-B/16 @ 448 (random weights)": backbone(vit_b16, 448),
        "DINOv2 saliency @ 224, end to end": saliency(224),
        "DINOv2 saliency @ 448, end to end": saliency(448),
    }


def measure(dense: torch.nn.Module, frames: list[torch.Tensor], stream) -> dict:
    dense_timings, eventful_timings = Timings(), Timings()
    macs, dense_macs = 0, 0
    for index, frame in enumerate(frames):
        pair = [(dense_timings, dense), (eventful_timings, stream)]
        for timings, call in pair if index % 2 == 0 else reversed(pair):
            timings.add(call, frame)
        if index > 0:
            macs += stream.ops.total
            dense_macs += stream.ops.dense
    dense_ms, eventful_ms = dense_timings.summary()[0], eventful_timings.summary()[0]
    return {"dense_ms": dense_ms, "eventful_ms": eventful_ms, "op_ratio": dense_macs / macs}


def operator_profile(
    call,
    frames: list[torch.Tensor],
    kinds: dict[str, tuple[str, ...]] = KINDS,
    other: str = "other",
) -> dict[str, float]:
    """Milliseconds per step of each kind of operator (`kinds`: names by the operators the
    profiler reports; the rest is `other`), self CPU time, over the frames after two. The
    blocks call each kernel from Python here, where the profiler sees it (a stream otherwise
    runs a block's step in one call of them all: `eventful::block_step`)."""
    block.FUSED_BLOCK_STEPS = False
    try:
        with torch.no_grad():
            for frame in frames[:2]:
                call(frame)
            with profile(activities=[ProfilerActivity.CPU]) as run:
                for frame in frames[2:]:
                    call(frame)
    finally:
        block.FUSED_BLOCK_STEPS = True
    steps = len(frames) - 2
    spent = dict.fromkeys([*kinds, other], 0.0)
    for event in run.key_averages():
        kind = next((name for name, ops in kinds.items() if event.key in ops), other)
        spent[kind] += event.self_cpu_time_total / 1000 / steps
    return spent


def profile_section(steps: int) -> str:
    dense, size, num_tokens = subjects()["ViT-S/14 @ 224 (DINOv2 backbone)"]()
    frames = real_frames(size, steps, 1)
    k = round(num_tokens / 4)
    columns = {"dense": operator_profile(dense, frames)}
    for level in LEVELS:
        model = eventful.convert(dense, policy=eventful.TopK(k), level=level)
        stream = model.stream(drift=None, check_finite=False)
        columns[f"{level}, k = {k}"] = operator_profile(stream, frames)
    header = ["operators", *columns]
    rows = [
        [kind, *(f"{spent[kind]:.1f}" for spent in columns.values())] for kind in [*KINDS, "other"]
    ]
    rows.append(["total", *(f"{sum(spent.values()):.1f}" for spent in columns.values())])
    return (
        f"#### Where a step's time goes: ViT-S/14 @ 224, k = N/4 ({k} of {num_tokens} tokens)\n\n"
        "Milliseconds per step of each kind of operator (self CPU time, torch profiler; the "
        "profiler's own cost included), over the same real frames.\n\n"
        + markdown_table(header, rows)
    )


def linear_layers_ms(model: torch.nn.Module, rows: int, repeats: int) -> list[float]:
    """Per repeat, milliseconds for every linear layer of `model`'s blocks, in order, each on
    `rows` input rows: what an engine that processes `rows` tokens per gate cannot avoid."""
    layers = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(1, rows, m.in_features) for m in layers}
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for layer in layers:
                layer(inputs[layer.in_features])
            times.append(1000 * (time.perf_counter() - start))
    return times


def linear_rows_section(repeats: int) -> str:
    """The backbones' linear layers alone at k rows against N rows, interleaved by round."""
    header = [
        "model",
        "k",
        "linear layers, N rows ms",
        "linear layers, k rows ms",
        "speedup",
        "row ratio",
        "row efficiency",
    ]
    rows = []
    for name, build in subjects().items():
        if "end to end" in name:
            continue
        model, _, num_tokens = build()
        counts = [max(1, round(f * num_tokens)) for f in FRACTIONS]
        times = {count: [] for count in counts}
        for _ in range(repeats):
            for count in counts:
                times[count] += linear_layers_ms(model, count, 1)
        full = statistics.median(times[num_tokens])
        for count in counts[1:]:
            spent = statistics.median(times[count])
            speedup, row_ratio = full / spent, num_tokens / count
            rows.append(
                [
                    name,
                    str(count),
                    f"{full:.1f}",
                    f"{spent:.1f}",
                    f"{speedup:.2f}",
                    f"{row_ratio:.2f}",
                    f"{speedup / row_ratio:.2f}",
                ]
            )
            print(*rows[-1], sep=" | ", flush=True)
    return (
        "#### The dense model's linear layers alone at k rows\n\n"
        "Every linear layer of the backbone's blocks (`nn.Linear`, the model's own weights) run "
        f"in order on k rows against N rows (interleaved, medians of {repeats} rounds). This is "
        "the same library on fewer rows, not a limit of the machine: sections roofline and "
        "small-rows-linear put each layer beside this machine's measured peak and bandwidth, "
        f"and the engine's blocks run their own kernel up to {SMALL_ROWS} rows.\n\n"
        + markdown_table(header, rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="time steps, the first excluded")
    parser.add_argument("--subjects", nargs="+", help="subject names (default: all)")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = subjects()
    names = args.subjects or list(chosen)
    header = ["model", "level", "k", "dense ms", "eventful ms", "speedup", "op ratio", "efficiency"]
    rows = []
    for name in names:
        dense, size, num_tokens = chosen[name]()
        frames = real_frames(size, args.steps, 1)
        for level in LEVELS:
            for fraction in FRACTIONS:
                k = max(1, round(fraction * num_tokens))
                model = eventful.convert(dense, policy=eventful.TopK(k), level=level)
                result = measure(dense, frames, model.stream(drift=None, check_finite=False))
                speedup = result["dense_ms"] / result["eventful_ms"]
                rows.append(
                    [
                        name,
                        level,
                        f"{k} (N)" if fraction == 1 else f"{k} (N/{round(1 / fraction)})",
                        f"{result['dense_ms']:.1f}",
                        f"{result['eventful_ms']:.1f}",
                        f"{speedup:.2f}",
                        f"{result['op_ratio']:.2f}",
                        f"{speedup / result['op_ratio']:.2f}",
                    ]
                )
                print(*rows[-1], sep=" | ", flush=True)
    body = (
        "### Speed at the sizes users run (CPU, batch 1)\n\n"
        f"{args.threads} threads, {args.steps} steps per variant, each interleaved with its own "
        "dense run on the same real frames (bikes.mp4); medians over the steps after the first. "
        "Op ratio: dense over eventful multiply-accumulates of the whole model timed (the "
        "saliency decoder included end to end) over the same steps; efficiency: speedup over "
        "op ratio. Streams count ops and run without drift control. Targets (issue 12): the "
        "saliency model at 224, exact, N/4, at least 2x faster end to end; ViT-S/14 at 224, "
        "N/4, efficiency at least 0.75; with every token (k = N), at most 5% slower than dense at "
        "the tokenwise and exact levels.\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        + profile_section(args.steps)
        + "\n\n"
        + linear_rows_section(max(args.steps, 12))
    )
    write_or_print("user-sizes", body, args.write)


if __name__ == "__main__":
    main()
