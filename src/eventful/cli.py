"""The `eventful` command."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import eventful
from eventful.synthetic import moving_squares


def demo(frames: int, level: str, fraction: float, seed: int) -> None:
    """Eventful against dense on a synthetic moving scene, with a randomly initialised ViT-S/16.

    A stand-in until the real-weights demo exists: it shows the ops saved per frame and how
    far the eventful output is from the dense one.
    """
    torch.manual_seed(seed)
    vit = eventful.ViT(image_size=224, patch_size=16, dim=384, depth=12, heads=6).eval()
    model = eventful.convert(vit, policy=eventful.TopFraction(fraction), level=level)
    stream = model.stream(batch_size=1)
    video = moving_squares(frames, size=224, seed=seed)
    print(f"ViT-S/16 (random weights), 224x224, level={level}, policy={model.policy}")
    print(f"{'frame':>5} {'GMACs':>8} {'dense':>8} {'saved':>6} {'max |diff|':>11} {'cosine':>7}")
    total, dense_total = 0, 0
    with torch.no_grad():
        for index, frame in enumerate(video):
            output = stream(frame)
            reference = vit(frame)
            cosine = F.cosine_similarity(output, reference, dim=-1).mean().item()
            difference = (output - reference).abs().max().item()
            ops = stream.ops
            total += ops.total
            dense_total += ops.dense
            saved = 1 - ops.total / ops.dense
            print(
                f"{index:>5} {ops.total / 1e9:>8.3f} {ops.dense / 1e9:>8.3f} {saved:>6.1%} "
                f"{difference:>11.2e} {cosine:>7.4f}"
            )
    print(f"over {frames} frames: {dense_total / total:.2f}x fewer multiply-accumulates than dense")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eventful", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="eventful vs dense on a synthetic moving scene")
    demo_parser.add_argument("--frames", type=int, default=12)
    demo_parser.add_argument("--level", choices=("tokenwise", "qk", "full"), default="full")
    demo_parser.add_argument("--fraction", type=float, default=0.25)
    demo_parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.frames, args.level, args.fraction, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
