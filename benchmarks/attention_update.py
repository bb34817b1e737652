"""Attention alone, one block: dense fused attention against the full and exact levels' updates.

Shows where the efficiency of the attention levels goes: the multiply-accumulates each level
counts, the time it takes, and the rate (GMAC/s) it runs at, next to the token-wise linear
layers on k rows and on all N rows. Runs interleaved, medians over the repeats, threads pinned.
Prints the table; with --write, writes the `attention-update` section of BENCHMARKS.md.

python benchmarks/attention_update.py --write
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from report import markdown_table, write_or_print

import eventful
from eventful.core.attention import (
    recompute_attention_rows,
    recompute_full_attention,
    update_exact_attention,
    update_full_attention,
)
from eventful.core.ops import dense_block_macs, eventful_block_macs

# (name, image size, patch, dim, heads): the models of the speed benchmark.
SHAPES = {
    "ViT-B/16 @ 384": (384, 16, 768, 12),
    "DINOv2-S/14 @ 518": (518, 14, 384, 6),
}
FRACTIONS = (0.5, 0.25, 0.125)


def one_block(size: int, patch: int, dim: int, heads: int):
    vit = eventful.ViT(image_size=size, patch_size=patch, dim=dim, depth=1, heads=heads).eval()
    return eventful.convert(vit, policy=eventful.TopK(1), level="full").encoder.blocks[0], vit


class Case:
    """Buffered q, k, v of one stream and one block, and each level's caches over them."""

    def __init__(self, heads: int, tokens: int, width: int, selected: int, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.q, self.k, self.v = (self.noise(heads, tokens, width) for _ in range(3))
        self.selected = selected
        self.full = [
            torch.empty(heads, tokens, width),
            torch.empty(heads, tokens, tokens),
            torch.empty(heads, tokens),
            torch.empty(heads, tokens),
        ]
        recompute_full_attention(*self.full, self.q, self.k, self.v)
        self.exact = [
            torch.empty(heads, tokens, width),
            torch.empty(heads, tokens),
            torch.empty(heads, tokens),
        ]
        recompute_attention_rows(*self.exact, self.q, self.k, self.v, torch.arange(tokens))

    def noise(self, *shape: int) -> torch.Tensor:
        # Logits of unit scale, as after a LayerNorm and a scaled projection.
        return 0.35 * torch.randn(*shape, generator=self.generator)

    def change(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Move `selected` random tokens; their old keys and values, and their index."""
        heads, tokens, width = self.q.shape
        index = torch.randperm(tokens, generator=self.generator)[: self.selected]
        old_keys, old_values = self.k[:, index].clone(), self.v[:, index].clone()
        for tensor in (self.q, self.k, self.v):
            tensor[:, index] += 0.3 * self.noise(heads, self.selected, width)
        return old_keys, old_values, index


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # With a batch dimension, as the model calls it: 3-d inputs miss the fused CPU kernel.
    return F.scaled_dot_product_attention(q[None], k[None], v[None], scale=1.0)[0]


def measure(name: str, fraction: float, repeats: int) -> list[list[object]]:
    size, patch, dim, heads = SHAPES[name]
    block, vit = one_block(size, patch, dim, heads)
    tokens = vit.embedding.num_tokens(size, size)
    selected = max(1, round(fraction * tokens))
    case = Case(heads, tokens, dim // heads, selected, seed=selected)
    rows_all, rows_k = torch.randn(tokens, dim), torch.randn(selected, dim)
    timings: dict[str, list[float]] = {}
    recomputed: dict[str, list[int]] = {"full": [], "exact": []}

    def timed(label: str, call, *args) -> object:
        start = time.perf_counter()
        value = call(*args)
        timings.setdefault(label, []).append((time.perf_counter() - start) * 1000)
        return value

    def linear(rows: torch.Tensor) -> None:
        qkv = block.qkv(rows)
        block.proj(qkv[:, :dim])
        block.fc2(block.fc1(rows))

    q, k, v = case.q, case.k, case.v
    for _ in range(repeats + 1):
        old_keys, old_values, index = case.change()
        changed = (q, k, v, old_keys, old_values, index)
        timed("dense attention", dense_attention, q, k, v)
        recomputed["full"].append(timed("full update", update_full_attention, *case.full, *changed))
        recomputed["exact"].append(
            timed("exact update", update_exact_attention, *case.exact, *changed)
        )
        timed("linear layers, N rows", linear, rows_all)
        timed(f"linear layers, k = {selected} rows", linear, rows_k)

    counts = dict.fromkeys(("qkv", "proj", "mlp"), selected)
    dense = dense_block_macs(block, tokens)
    macs = {
        "dense attention": dense["attention"],
        "linear layers, N rows": dense["linear"],
        f"linear layers, k = {selected} rows": eventful_block_macs(
            block, tokens, counts, False, True
        )["linear"],
    }
    for level in ("full", "exact"):
        block.level = level
        rows = round(statistics.fmean(recomputed[level][1:]))
        macs[f"{level} update"] = eventful_block_macs(block, tokens, counts, False, True, rows)[
            "attention"
        ]
    dense_ms = statistics.median(timings["dense attention"][1:])
    table = []
    for label, values in timings.items():
        median = statistics.median(values[1:])
        table.append(
            [
                name,
                f"{selected} (N/{round(1 / fraction)})",
                label,
                f"{median:.2f} [{min(values[1:]):.2f}-{max(values[1:]):.2f}]",
                f"{macs[label] / 1e6:.0f}",
                f"{macs[label] / median / 1e6:.1f}",
                f"{median / dense_ms:.2f}" if "attention" in label or "update" in label else "-",
            ]
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = ["shape", "k", "work", "ms", "MMAC", "GMAC/s", "time / dense attention"]
    rows = []
    with torch.no_grad():
        for name in SHAPES:
            for fraction in FRACTIONS:
                rows += measure(name, fraction, args.repeats)
                print(*rows[-1], sep=" | ", flush=True)
    body = (
        "### Attention alone: where the attention levels' efficiency goes\n\n"
        "One block, one stream, batch 1: dense fused attention (SDPA) against the full level's "
        "and the exact level's incremental updates, after k random tokens moved (synthetic q, "
        "k, v of unit-scale logits), and the block's token-wise linear layers on k rows and on "
        f"all N rows for scale. Interleaved, {args.repeats} repeats after one warm-up, median "
        "[min-max] ms. MMAC: multiply-accumulates as the op counter counts them "
        "(eventful.core.ops); GMAC/s: the rate the work ran at.\n\n" + markdown_table(header, rows)
    )
    write_or_print("attention-update", body, args.write)


if __name__ == "__main__":
    main()
