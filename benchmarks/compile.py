"""Does torch.compile help? Eager against compiled eventful steps (top-k, static shapes).

Prints the table; with --write, writes the `compile` section of BENCHMARKS.md.

python benchmarks/compile.py --sizes 224 384 --fraction 0.25 --write
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import markdown_table, write_or_print

import eventful
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.video.preprocess import letterbox


def timed(stream, frame) -> float:
    start = time.perf_counter()
    stream(frame)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 384])
    parser.add_argument("--levels", nargs="+", default=["tokenwise", "full", "exact"])
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        torch.manual_seed(0)
        vit = eventful.ViT(image_size=size, patch_size=16, dim=768, depth=12, heads=12).eval()
        k = round(args.fraction * vit.embedding.num_tokens(size, size))
        decoded = decode_frames(registry_clip("bikes.mp4"), args.steps + 2)
        frames = [letterbox(frame, size).unsqueeze(0) for frame in decoded]
        for level in args.levels:
            model = eventful.convert(vit, policy=eventful.TopK(k), level=level)
            eager = model.stream(count_ops=False, check_finite=False)
            compiled = model.stream(count_ops=False, check_finite=False, compile=True)
            start = time.perf_counter()
            for frame in frames[:2]:  # the dense first step and the first eventful step
                eager(frame)
                compiled(frame)
            warm_up = time.perf_counter() - start
            eager_ms, compiled_ms = [], []
            for frame in frames[2:]:
                eager_ms.append(timed(eager, frame))
                compiled_ms.append(timed(compiled, frame))
            median_eager, median_compiled = (statistics.median(t) for t in (eager_ms, compiled_ms))
            rows.append(
                [
                    f"ViT-B/16 @ {size}",
                    level,
                    k,
                    f"{median_eager:.1f} [{min(eager_ms):.1f}-{max(eager_ms):.1f}]",
                    f"{median_compiled:.1f} [{min(compiled_ms):.1f}-{max(compiled_ms):.1f}]",
                    f"{median_eager / median_compiled:.2f}",
                    f"{warm_up:.0f}",
                ]
            )
            print(*rows[-1], sep=" | ", flush=True)
    header = [
        "model",
        "level",
        "k",
        "eager ms",
        "compiled ms",
        "eager / compiled",
        "warm-up s (compile)",
    ]
    body = (
        "### torch.compile of the top-k step (CPU, batch 1)\n\n"
        f"`model.stream(compile=True)` against eager, interleaved, {args.steps} steps after "
        "the first two, medians [min-max], real frames (bikes.mp4), random weights. Warm-up: "
        "both streams' first two steps, which include compiling.\n\n" + markdown_table(header, rows)
    )
    write_or_print("compile", body, args.write)


if __name__ == "__main__":
    main()
