"""Long streams: error against the dense model over thousands of frames, drift control on and off.

Two sources, each `--frames` long: the registry clips with camera motion played one after the
other and looped (every switch and every loop is a hard cut), and a synthetic scene that drifts
slowly (a real frame panned by a pixel every few frames under a slowly rising brightness), the
case where unselected tokens creep away from their references. The real DINOv2 saliency model
runs densely once per frame; every drift-control setting runs its own eventful stream on the
same frame, at a fixed quarter of the tokens. Prints the tables; with --write, writes the
`long-stream` section of BENCHMARKS.md.

    python benchmarks/long_stream.py --frames 3000 --threads 1 --jobs 2 --write
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import statistics
from collections.abc import Iterator

import torch
from report import markdown_table, write_or_print

import eventful
from eventful.core.drift import DriftControl
from eventful.evaluation import feature_cosine, output_tokens
from eventful.models.imgfocus import imgfocus_saliency
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.video.preprocess import letterbox

CLIPS = ("bikes.mp4", "bigbuckbunny.mp4")
SETTINGS = {
    "off": None,
    "refresh every 60": DriftControl(refresh_every=60),
    "scene cuts + refresh every 60": DriftControl(refresh_every=60, scene_cut_factor=4.0),
}
FRACTION = 0.25


def looped_clips(frames: int) -> Iterator[torch.Tensor]:
    """The clips one after the other, looped, letterboxed to 224: (1, 3, 224, 224) each."""
    decoded = [[letterbox(f).unsqueeze(0) for f in decode_frames(registry_clip(c))] for c in CLIPS]
    return itertools.islice(itertools.cycle(itertools.chain(*decoded)), frames)


def slow_drift(frames: int) -> Iterator[torch.Tensor]:
    """A 224x224 window panned back and forth across a real frame letterboxed to 448, one pixel
    every 4 frames (no jump where the pan turns), brightening by 1e-4 per frame."""
    first = next(iter(decode_frames(registry_clip(CLIPS[0]), 1)))
    wide = letterbox(first, 448)
    span = 448 - 224
    for t in range(frames):
        step = (t // 4) % (2 * span)
        offset = step if step < span else 2 * span - step
        yield (wide[:, 112 : 112 + 224, offset : offset + 224] + 1e-4 * t).unsqueeze(0)


SOURCES = {"clips looped and cut together": looped_clips, "synthetic slow drift": slow_drift}


def run(source: str, frames: int, window: int) -> list[list[object]]:
    dense = imgfocus_saliency()
    policy = eventful.TopFraction(FRACTION)
    streams = {
        name: eventful.convert(dense, policy=policy).stream(drift=drift)
        for name, drift in SETTINGS.items()
    }
    cosines = {name: [] for name in SETTINGS}
    macs = {name: 0 for name in SETTINGS}
    dense_macs = 0
    with torch.no_grad():
        for index, frame in enumerate(SOURCES[source](frames)):
            reference = output_tokens(dense(frame))
            for name, stream in streams.items():
                tokens = output_tokens(stream(frame))
                cosines[name].append(feature_cosine(tokens, reference).mean().item())
                macs[name] += stream.ops.total
            dense_macs += stream.ops.dense
            if index % 500 == 0:
                print(source, index, {n: round(c[-1], 4) for n, c in cosines.items()}, flush=True)
    rows = []
    for name, values in cosines.items():
        windows = [values[i : i + window] for i in range(0, len(values), window)]
        kinds = [event.kind for event in streams[name].event_log]
        refreshes = f"{kinds.count('scene_cut')} / {kinds.count('periodic')}"
        rows.append(
            [
                source,
                name,
                len(values),
                " / ".join(f"{statistics.fmean(w):.3f}" for w in windows),
                f"{min(values):.3f}",
                sum(v < 0.85 for v in values),
                refreshes,
                f"{dense_macs / macs[name]:.2f}",
            ]
        )
        print(*rows[-1], sep=" | ", flush=True)
    return rows


def run_source(job: tuple[str, int, int, int]) -> list[list[object]]:
    source, frames, window, threads = job
    torch.set_num_threads(threads)
    return run(source, frames, window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2, help="threads per source")
    parser.add_argument("--jobs", type=int, default=1, help="sources run at once, one process each")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    jobs = [(source, args.frames, args.window, args.threads) for source in SOURCES]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        rows = [row for source_rows in pool.map(run_source, jobs) for row in source_rows]
    header = [
        "source",
        "drift control",
        "frames",
        f"cosine mean per {args.window} frames",
        "cosine min",
        "frames < 0.85",
        "refreshes: scene cut / periodic",
        "op ratio",
    ]
    body = (
        "### Long streams: error against the dense model over thousands of frames\n\n"
        f"Real DINOv2 saliency model, 224x224, exact level, `TopFraction({FRACTION})`; cosine: "
        "mean patch-feature cosine to the dense model per frame. Refreshes: dense steps the "
        "drift control ran; the op ratio (dense / eventful multiply-accumulates) counts them. "
        "The looped clips cut at every switch between clips and at every loop, besides the "
        "clips' own cuts; the synthetic pan turns smoothly and has no cut.\n\n"
        + markdown_table(header, rows)
    )
    write_or_print("long-stream", body, args.write)


if __name__ == "__main__":
    main()
