"""Where the time of one eventful step goes, operator by operator (torch profiler, CPU).

Prints the tables; with --write, writes the `profile-step` section of BENCHMARKS.md.

python benchmarks/profile_step.py --size 384 --fraction 0.25 --write
"""

from __future__ import annotations

import argparse

import torch
from report import markdown_table, write_or_print
from torch.profiler import ProfilerActivity, profile

import eventful
from eventful.core.block import LEVELS
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.video.preprocess import letterbox


def operator_table(level: str, size: int, fraction: float, steps: int, rows: int) -> str:
    torch.manual_seed(0)
    vit = eventful.ViT(image_size=size, patch_size=16, dim=768, depth=12, heads=12).eval()
    k = round(fraction * vit.embedding.num_tokens(size, size))
    stream = eventful.convert(vit, policy=eventful.TopK(k), level=level).stream(
        count_ops=False, check_finite=False
    )
    frames = [
        letterbox(f, size).unsqueeze(0)
        for f in decode_frames(registry_clip("bikes.mp4"), steps + 2)
    ]
    stream(frames[0])
    stream(frames[1])
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as run:
        for frame in frames[2:]:
            stream(frame)
    averages = sorted(run.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in averages)
    table = [
        [
            e.key,
            f"{e.self_cpu_time_total / steps / 1000:.1f}",
            f"{100 * e.self_cpu_time_total / total:.1f}%",
            e.count // steps,
        ]
        for e in averages[:rows]
    ]
    header = ["operator", "ms per step", "share", "calls per step"]
    return (
        f"**level {level}, k = {k}** ({total / steps / 1000:.1f} ms per step under the "
        "profiler)\n\n" + markdown_table(header, table)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tables = [
        operator_table(level, args.size, args.fraction, args.steps, args.rows)
        for level in args.levels
    ]
    body = (
        f"### Where the time of a step goes: ViT-B/16 @ {args.size}, batch 1, "
        f"k = {args.fraction} N\n\nSelf CPU time per operator, averaged over {args.steps} "
        "steps after the first two, real frames (bikes.mp4).\n\n" + "\n\n".join(tables)
    )
    write_or_print("profile-step", body, args.write)


if __name__ == "__main__":
    main()
