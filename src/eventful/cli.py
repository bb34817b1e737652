"""The `eventful` command: run an eventful model on a video and show what it saves and costs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from eventful.core.block import LEVELS
from eventful.core.budget import parse_schedule
from eventful.core.drift import DriftControl
from eventful.core.policies import parse_policy
from eventful.zoo import MODEL_NAMES, load_model

DEMO_CLIP = "bikes.mp4"


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line, like every other error of the command."""

    def error(self, message: str) -> None:
        print(f"eventful: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="eventful", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    run = commands.add_parser("run", help="run an eventful model on a video")
    run.add_argument("video", help="a video file that ffmpeg can decode")
    add_run_options(run)
    demo = commands.add_parser(
        "demo", help=f"the real DINOv2 saliency model on a real clip ({DEMO_CLIP}), compared"
    )
    demo.add_argument("--output", default="eventful-demo", help="folder for demo.json/png/mp4")
    add_run_options(demo)
    return parser


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="dinov2-saliency", help=f"one of {MODEL_NAMES}")
    parser.add_argument("--size", type=int, default=224, help="model input side in pixels")
    parser.add_argument(
        "--policy",
        default="fraction:0.25",
        help="topk:K, fraction:F, threshold:T, ops:G (a budget of G GMACs per frame) or "
        "latency:MS (a budget of MS milliseconds per frame)",
    )
    parser.add_argument(
        "--budget-schedule",
        metavar="FRAME:POLICY,...",
        help="change the policy or budget at given frames, e.g. 0:ops:2,100:ops:1,200:fraction:0.5 "
        "(--policy holds until the first; a budget of the kind in force keeps what it learned)",
    )
    parser.add_argument(
        "--refresh", type=int, metavar="N", help="a dense frame once N frames pass without one"
    )
    parser.add_argument(
        "--error-bound",
        type=float,
        metavar="B",
        help="a dense frame after one whose unprocessed change (first block) exceeds B",
    )
    parser.add_argument(
        "--scene-cut",
        type=float,
        metavar="F",
        help="a dense frame where the frame's change (as 16x16 cell means) exceeds F times the "
        "recent typical change",
    )
    parser.add_argument("--level", choices=LEVELS, default="exact")
    parser.add_argument("--compare", action="store_true", help="also run dense; report fidelity")
    parser.add_argument("--json", type=Path, help="write the run report as JSON")
    parser.add_argument("--viz", type=Path, help="write frame | updated tokens | saliency video")
    parser.add_argument("--plot", type=Path, help="write a PNG of ops and fidelity per frame")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--max-frames", type=int, help="stop after this many frames")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except KeyboardInterrupt:
        print("eventful: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure is one line for the user, never a traceback
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"eventful: error: {message}", file=sys.stderr)
        return 1


def run_command(args: argparse.Namespace) -> int:
    from eventful.video.clips import registry_clip
    from eventful.video.decode import VideoReader
    from eventful.video.report import run_report, summary_table
    from eventful.video.runner import run_video
    from eventful.viz.video import RunVisualiser

    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be at least 1, got {args.max_frames}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    policy = parse_policy(args.policy)
    schedule = parse_schedule(args.budget_schedule) if args.budget_schedule else []
    drift = None
    if (args.refresh, args.error_bound, args.scene_cut) != (None, None, None):
        try:
            drift = DriftControl(args.refresh, args.error_bound, args.scene_cut)
        except ValueError as error:
            raise ValueError(f"{error} (from --refresh, --error-bound, --scene-cut)") from None
    if args.command == "demo":
        video = registry_clip(DEMO_CLIP)
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        args.compare = True
        args.json = args.json or output / "demo.json"
        args.plot = args.plot or output / "demo.png"
        args.viz = args.viz or output / "demo.mp4"
    else:
        video = Path(args.video)
    probe = VideoReader(video)  # an unreadable video fails before the model loads
    fps = probe.fps
    probe.close()
    model = load_model(args.model, args.size)
    progress = Progress()
    visualise = RunVisualiser(args.viz, model, fps) if args.viz else None

    def on_frame(view) -> None:
        progress.update(view.result)
        if visualise is not None:
            visualise(view)

    try:
        result = run_video(
            video,
            model,
            policy,
            level=args.level,
            compare=args.compare,
            max_frames=args.max_frames,
            device=args.device,
            on_frame=on_frame,
            drift=drift,
            schedule=schedule,
        )
    finally:
        progress.finish()
        if visualise is not None:
            visualise.close()
    if not result.frames:
        raise ValueError(
            f"no frame of {video} could be decoded ({result.frames_failed} failed); nothing to do"
        )
    report = run_report(result)
    print(summary_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"report: {args.json}")
    if args.plot:
        from eventful.viz.plot import plot_run

        plot_run(report, args.plot)
        print(f"plot: {args.plot}")
    if args.viz:
        print(f"video: {args.viz}")
    return 0


class Progress:
    """A one-line progress display on stderr: frames, fps, tokens updated, ops saved."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.frames = 0
        self.macs = 0
        self.dense_macs = 0
        self.updated = 0.0
        self.interactive = sys.stderr.isatty()
        self.shown = False

    def update(self, frame) -> None:
        self.frames += 1
        self.macs += frame.macs
        self.dense_macs += frame.dense_macs
        self.updated += frame.updated_fraction
        if self.interactive or self.frames % 50 == 0:
            elapsed = time.perf_counter() - self.start
            saved = 1 - self.macs / self.dense_macs
            line = (
                f"frame {self.frames} | {self.frames / elapsed:.1f} fps | tokens updated "
                f"{self.updated / self.frames:.1%} | ops saved {saved:.1%}"
            )
            end = "\r" if self.interactive else "\n"
            print(line, end=end, file=sys.stderr, flush=True)
            self.shown = True

    def finish(self) -> None:
        if self.shown and self.interactive:
            print(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
