"""Scene cuts: which frames the drift control's cut detector flags, on the grid and at full size.

Runs the real `DriftMonitor` (no model) over every frame of each registry clip, letterboxed to
224x224, once comparing frames on its `CUT_GRID` grid of cell means and once at full
resolution (pixel by pixel). Per clip: the frames it flags as cuts at
`--factor`, the smallest ratio among them and the largest ratio among the other frames (the
margin on either side of the factor). Prints the table; with --write, writes the `scene-cuts`
section of BENCHMARKS.md.

    python benchmarks/scene_cuts.py --write
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from report import markdown_table, write_or_print

import eventful
from eventful.core import drift
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.video.preprocess import letterbox

CLIPS = ("bikes.mp4", "bigbuckbunny.mp4")


def cut_ratios(frames: list[torch.Tensor], factor: float) -> list[float | None]:
    """The detector's ratio per frame (None before it has a history), as a stream sees it."""
    monitor = eventful.DriftControl(scene_cut_factor=factor).monitor(1)
    ratios = []
    for index, frame in enumerate(frames):
        plan = monitor.plan(frame, index, fresh=[index == 0])
        ratios.append(None if plan.changes is None else monitor.cut_ratio(0, plan.changes[0]))
        monitor.commit(plan, frame, index, [0] if plan.events else [], None)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    rows = []
    for clip in CLIPS:
        frames = [letterbox(f).unsqueeze(0) for f in decode_frames(registry_clip(clip))]
        for name, cells in (
            (f"{drift.CUT_GRID}x{drift.CUT_GRID} grid", drift.CUT_GRID),
            ("full resolution", 10**9),
        ):
            with mock.patch.object(drift, "CUT_GRID", cells):  # more cells than pixels: full size
                ratios = cut_ratios(frames, args.factor)
            known = [(index, r) for index, r in enumerate(ratios) if r is not None]
            flagged = [(index, r) for index, r in known if r > args.factor]
            rest = [r for _, r in known if r <= args.factor]
            rows.append(
                [
                    clip,
                    len(frames),
                    name,
                    ", ".join(f"{index} ({r:.1f}x)" for index, r in flagged) or "-",
                    f"{min(r for _, r in flagged):.2f}" if flagged else "-",
                    f"{max(rest):.2f}",
                ]
            )
            print(*rows[-1], sep=" | ", flush=True)
    body = (
        "### Scene cuts: what the cut detector flags on the registry clips\n\n"
        "`DriftMonitor` alone, every frame letterboxed to 224x224. Ratio: a frame's mean "
        "absolute change to the previous frame over the typical change of its last "
        f"{drift.CUT_HISTORY} frames (the larger of their median and mean, and at least "
        f"{drift.CUT_CONTRAST_FLOOR} times the previous frame's contrast); a cut is a ratio "
        f"above `scene_cut_factor={args.factor}`. Grid: frames compared as cell means (the "
        "engine's detector); full resolution: pixel by pixel. Smallest flagged and largest "
        "other: the margins on either side of the factor.\n\n"
        + markdown_table(
            ["clip", "frames", "compared", "flagged (ratio)", "smallest flagged", "largest other"],
            rows,
        )
    )
    write_or_print("scene-cuts", body, args.write)


if __name__ == "__main__":
    main()
