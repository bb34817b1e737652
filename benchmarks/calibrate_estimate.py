"""Fit the fidelity estimate of the zoo's DINOv2 saliency model, one per attention level, and
ship it with the package (src/eventful/models/estimates/dinov2-saliency-<level>.json).

Calibration frames: bikes.mp4 frames 0-99 (pans, zooms, a cut) and carphone_pristine.mp4
frames 0-59 (a talking head in a moving car), each run under a tenth, a quarter and half of the
tokens with drift control off (`eventful.calibration.calibrate_fidelity_estimate`). The other
frames of the registry clips, and every edit of them, are left for the evaluation in
benchmarks/safe_defaults.py. Writes the `estimate-calibration` section of BENCHMARKS.md.

    python benchmarks/calibrate_estimate.py --threads 2 --write
"""

from __future__ import annotations

import argparse

import torch
from report import markdown_table, write_or_print

import eventful
from eventful.calibration import calibrate_fidelity_estimate
from eventful.core.block import LEVELS
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.zoo import load_model

CALIBRATION_FRAMES = {"bikes.mp4": (0, 100), "carphone_pristine.mp4": (0, 60)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", default=",".join(LEVELS), help="comma-separated levels")
    parser.add_argument(
        "--write", action="store_true", help="write the estimates and BENCHMARKS.md"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("dinov2-saliency", 224)
    clips = []
    for name, (start, stop) in CALIBRATION_FRAMES.items():
        frames = list(decode_frames(registry_clip(name), stop))[start:]
        clips.append([model.preprocess(frame).unsqueeze(0) for frame in frames])
    rows = []
    for level in args.levels.split(","):
        converted = eventful.convert(model.dense, policy=eventful.TopFraction(0.25), level=level)
        estimate = calibrate_fidelity_estimate(model.dense, converted, clips)
        if args.write:
            estimate.save(model.estimate_path(level))
        rows.append(
            [
                level,
                f"{estimate.coefficient:.4g}",
                f"{estimate.exponent:.4g}",
                estimate.frames,
                f"{estimate.quantile:g}",
                estimate.fingerprint,
            ]
        )
        print(*rows[-1], sep=" | ", flush=True)
    frames = ", ".join(f"{name} {a}-{b - 1}" for name, (a, b) in CALIBRATION_FRAMES.items())
    body = (
        "### Fidelity estimate: the fit shipped with the DINOv2 saliency model\n\n"
        "Estimated cosine = 1 - a u^p, u the mean unprocessed share of all gates "
        "(`eventful.core.estimate`). Fitted at 224x224 on frames "
        f"{frames}, each under `TopFraction` 0.1, 0.25 and 0.5 with drift control off; a is set "
        "so that the estimate is not optimistic on the quantile's share of those steps. "
        'How it does on other frames: section "fidelity-estimate".\n\n'
        + markdown_table(["level", "a", "p", "steps fitted", "quantile", "fingerprint"], rows)
    )
    write_or_print("estimate-calibration", body, args.write)


if __name__ == "__main__":
    main()
