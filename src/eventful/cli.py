"""The `eventful` command: run an eventful model on a video and show what it saves and costs;
train the small modules of a method (`eventful train iared2`), or fine-tune a model for token
recycling (`eventful train tore`); serve cameras on a local Ray cluster (`eventful serve`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path

import torch

from eventful.cli_drift import add_drift_options, drift_control
from eventful.cli_precision import add_precision_option
from eventful.cli_serve import add_serve_parser, serve_command
from eventful.cli_train import add_train_parser, train_command
from eventful.core.block import LEVELS
from eventful.core.budget import parse_schedule
from eventful.core.policies import parse_policy
from eventful.core.precision import resolve_precision
from eventful.profile import Profile
from eventful.viz.plot import PLOT_SUFFIXES
from eventful.viz.video import VIDEO_SUFFIXES
from eventful.zoo import MODEL_NAMES, load_model

DEMO_CLIP = "bikes.mp4"
# The demo's default length: enough frames to see the savings settle, few enough to watch
# (each frame runs the eventful and the dense model and goes into the side-by-side video).
DEMO_FRAMES = 40


def package_version() -> str:
    """The installed package's version, or a placeholder where eventful runs uninstalled."""
    try:
        return metadata.version("eventful")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line, like every other error of the command."""

    def error(self, message: str) -> None:
        print(f"eventful: error: {message}", file=sys.stderr)
        raise SystemExit(2)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that states every option's default: "(default: X)" unless its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if action.default is None:
            default = "none"
        elif action.default is False:
            default = "off"
        else:
            default = "%(default)s"
        return f"{text} (default: {default})".strip()


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="eventful", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    run = commands.add_parser(
        "run", help="run an eventful model on a video", formatter_class=DefaultsHelpFormatter
    )
    run.add_argument("video", help="a video file that ffmpeg can decode")
    add_run_options(run, demo=False)
    demo = commands.add_parser(
        "demo",
        help=f"the real DINOv2 saliency model on a real clip ({DEMO_CLIP}), compared to dense",
        formatter_class=DefaultsHelpFormatter,
    )
    demo.add_argument("--output", default="eventful-demo", help="folder for demo.json/png/mp4")
    add_run_options(demo, demo=True)
    add_train_parser(commands, DefaultsHelpFormatter)
    add_serve_parser(commands, DefaultsHelpFormatter)
    return parser


def add_run_options(parser: argparse.ArgumentParser, demo: bool) -> None:
    """The options of `run` and `demo`; the demo always compares, writes into its --output
    folder and stops after DEMO_FRAMES frames unless --all-frames."""
    parser.add_argument(
        "--model",
        default="dinov2-saliency",
        help=f"one of {', '.join(MODEL_NAMES)}, or hf:DIR for a local Hugging Face checkpoint "
        "folder (config.json and weights)",
    )
    parser.add_argument(
        "--size",
        type=int,
        metavar="S",
        default=None,
        help="model input side in pixels (default: the model's own, 224 for dinov2-saliency), "
        "rounded down to a multiple of the patch size (14 pixels for DINOv2) so that the "
        "letterboxed frame fills the patch grid",
    )
    parser.add_argument(
        "--policy",
        metavar="P",
        default="fraction:0.25",
        help="topk:K, fraction:F, threshold:T, ops:G (a budget of G GMACs per frame, head "
        "included), latency:MS (a budget of MS milliseconds per frame) or cosine:C (per frame, "
        "the fewest tokens that keep the estimated cosine to dense at C or above; needs the "
        "model's fidelity estimate)",
    )
    parser.add_argument(
        "--budget-schedule",
        metavar="FRAME:POLICY,...",
        help="change the policy or budget at given frames, e.g. 0:ops:2,100:ops:1,200:fraction:0.5 "
        "(--policy holds until the first; a budget of the kind in force keeps what it learned)",
    )
    add_drift_options(parser)
    parser.add_argument("--level", choices=LEVELS, default="exact", help="attention update level")
    add_precision_option(parser)
    parser.add_argument(
        "--method",
        choices=("eventful", "iared2"),
        default="eventful",
        help="eventful: re-process what changed between frames; iared2: drop the patches that "
        "trained interpreters rate uninformative, in every frame (needs --weights)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        metavar="CKPT",
        help="the interpreters of --method iared2, from `eventful train iared2`",
    )
    parser.add_argument(
        "--keep",
        metavar="RULE",
        default="0.5",
        help="--method iared2: keep the patches rated at least this probability; T:K also "
        "keeps at most K per group",
    )
    if not demo:
        parser.add_argument(
            "--compare", action="store_true", help="also run dense; report fidelity"
        )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print where the time of a frame goes, part by part (eventful.profile)",
    )

    def in_output(name: str) -> str:
        return f" (default: {name} in --output)" if demo else ""

    parser.add_argument(
        "--json",
        type=Path,
        metavar="OUT.json",
        help="write the run report to this .json file" + in_output("demo.json"),
    )
    parser.add_argument(
        "--viz",
        type=Path,
        metavar="OUT.mp4",
        help="write a frame | updated tokens | saliency video to this file "
        f"({_either(VIDEO_SUFFIXES)})" + in_output("demo.mp4"),
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="OUT.png",
        help=f"write ops and fidelity per frame to this {_either(PLOT_SUFFIXES)} file"
        + in_output("demo.png"),
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    if demo:
        frames = parser.add_mutually_exclusive_group()
        frames.add_argument(
            "--max-frames",
            type=int,
            metavar="N",
            default=DEMO_FRAMES,
            help="stop after this many frames",
        )
        frames.add_argument(
            "--all-frames",
            action="store_true",
            help=f"run every frame of {DEMO_CLIP}, not only the first --max-frames",
        )
    else:
        parser.add_argument(
            "--max-frames",
            type=int,
            metavar="N",
            help="stop after this many frames (default: every frame)",
        )
    parser.add_argument(
        "--threads", type=int, metavar="N", help="torch CPU threads (default: torch's own)"
    )


def _either(choices: tuple[str, ...]) -> str:
    """("a", "b", "c") -> "a, b or c"."""
    return " or ".join([", ".join(choices[:-1]), choices[-1]]) if len(choices) > 1 else choices[0]


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
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if args.command == "train":
            return train_command(args)
        if args.command == "serve":
            return serve_command(args)
        return run_video_command(args)
    finally:  # main() may run inside a longer-lived process (tests, notebooks)
        torch.set_num_threads(threads)


def run_video_command(args: argparse.Namespace) -> int:
    from eventful.video.clips import registry_clip
    from eventful.video.decode import VideoReader
    from eventful.video.report import run_report
    from eventful.video.runner import run_video
    from eventful.viz.terminal import RunProgress, print_summary
    from eventful.viz.video import RunVisualiser

    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be at least 1, got {args.max_frames}")
    policy = parse_policy(args.policy)
    schedule = parse_schedule(args.budget_schedule) if args.budget_schedule else []
    drift = drift_control(args)
    if args.method == "iared2":
        if args.weights is None:
            raise ValueError("--method iared2 needs --weights CKPT (from `eventful train iared2`)")
        policy = parse_keep_rule(args.keep)
    elif args.weights is not None:
        raise ValueError("--weights applies to --method iared2 only")
    if args.method == "iared2" and args.precision != "fp32":
        raise ValueError("--precision applies to --method eventful only")
    precision = resolve_precision(args.precision, args.device)  # before the model loads
    json_path, plot_path, viz_path = args.json, args.plot, args.viz
    max_frames = args.max_frames
    if args.command == "demo":
        video = registry_clip(DEMO_CLIP)
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        compare = True
        json_path = json_path or output / "demo.json"
        plot_path = plot_path or output / "demo.png"
        viz_path = viz_path or output / "demo.mp4"
        max_frames = None if args.all_frames else max_frames
    else:
        video = Path(args.video)
        compare = args.compare
    # Every output is checked before the model loads, not after minutes of video.
    check_output_path(json_path, "--json", (".json",))
    check_output_path(plot_path, "--plot", PLOT_SUFFIXES)
    check_output_path(viz_path, "--viz", VIDEO_SUFFIXES)
    probe = VideoReader(video, max_frames)  # an unreadable video fails before the model loads
    fps, total = probe.fps, probe.frame_count
    probe.close()
    model = load_model(args.model, args.size)
    iared2 = None if args.method != "iared2" else load_iared2(model.dense, args.weights)
    for note in model.notes:
        print(f"eventful: note: {note}", file=sys.stderr)
    progress = RunProgress(total)
    visualise = RunVisualiser(viz_path, model, fps) if viz_path else None

    def on_frame(view) -> None:
        progress.update(view.result)
        if visualise is not None:
            visualise(view)

    profile = Profile() if args.profile else contextlib.nullcontext()
    try:
        with profile:
            result = run_video(
                video,
                model,
                policy,
                level=args.level,
                compare=compare,
                max_frames=max_frames,
                device=args.device,
                on_frame=on_frame,
                drift=drift,
                schedule=schedule,
                iared2=iared2,
                precision=precision,
            )
    finally:
        progress.close()
        if visualise is not None:
            visualise.close()
    if not result.frames:
        raise ValueError(
            f"no frame of {video} could be decoded ({result.frames_failed} failed); nothing to do"
        )
    result.notes[:0] = model.notes
    report = run_report(result)
    print_summary(report)
    if args.profile:
        print(f"where the time goes: mean over {len(result.frames)} frames, the first included")
        print(profile.table(len(result.frames)))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
        print(f"report: {json_path}")
    if plot_path:
        from eventful.viz.plot import plot_run

        plot_run(report, plot_path)
        print(f"plot: {plot_path}")
    if viz_path:
        print(f"video: {viz_path}")
    return 0


def parse_keep_rule(text: str):
    """--keep T or T:K -> KeepRule(threshold=T, max_tokens=K)."""
    from eventful.methods.iared2 import KeepRule

    threshold, _, most = text.partition(":")
    try:
        return KeepRule(float(threshold), int(most) if most else None)
    except ValueError as error:
        message = f"--keep {text}: expected T or T:K (a probability, a count): {error}"
        raise ValueError(message) from error


def load_iared2(dense, weights: Path):
    """An IA-RED^2 model of `dense` with the interpreters of checkpoint `weights`, in the
    groups it was trained with."""
    from eventful.methods.iared2 import IARed2Model
    from eventful.methods.iared2_train import checkpoint_groups, read_checkpoint

    model = IARed2Model(dense, groups=checkpoint_groups(weights))
    read_checkpoint(weights, model)
    return model


def check_output_path(path: Path | None, option: str, suffixes: tuple[str, ...]) -> None:
    """Refuse an output path that the end of the run could not write: a suffix other than
    `suffixes`, a folder that does not exist or is not writable."""
    if path is None:
        return
    if path.suffix not in suffixes:
        raise ValueError(
            f"{option} {path}: expected a file name ending in {_either(suffixes)}, "
            f"got {path.suffix or 'no suffix'}"
        )
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the folder {folder} is not writable")
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder; expected a file name")


if __name__ == "__main__":
    sys.exit(main())
