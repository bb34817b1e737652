"""Spending what the content needs: `Fidelity(target)` (`--policy cosine:C`) against the CLI's
`TopFraction(0.25)`, on every source of benchmarks/safe_defaults.py (the registry clips and the
edits of them that defeat a fixed share of tokens).

For each source the real DINOv2 saliency model runs densely once per frame, and each policy
runs its own eventful stream (exact level, `DEFAULT_DRIFT`, the shipped fidelity estimate) on
the same frame, the streams in alternating order. Reports per policy: the encoder's op ratio,
the measured mean and minimum patch-feature cosine to dense, frames below 0.9 and 0.85, and the
median step time over the fraction's. Writes the "fidelity-policy" section of BENCHMARKS.md.

    python benchmarks/fidelity_policy.py --threads 1 --jobs 2 --write
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch
from report import markdown_table, write_or_print
from safe_defaults import sources

import eventful
from eventful.core.drift import DEFAULT_DRIFT
from eventful.evaluation import feature_cosine
from eventful.zoo import load_model

POLICIES = {
    "fraction:0.25": lambda: eventful.TopFraction(0.25),
    "cosine:0.95": lambda: eventful.Fidelity(0.95),
    "cosine:0.97": lambda: eventful.Fidelity(0.97),
    "cosine:0.98": lambda: eventful.Fidelity(0.98),
}


def run_source(job: tuple[str, int]) -> dict:
    """Per policy, the per-frame records of one source."""
    name, threads = job
    torch.set_num_threads(threads)
    model = load_model("dinov2-saliency", 224)
    streams = {}
    for policy, make in POLICIES.items():
        converted = eventful.convert(model.dense, policy=make(), level="exact")
        estimate = model.fidelity_estimate(converted.levels)
        streams[policy] = converted.stream(drift=DEFAULT_DRIFT, estimate=estimate)
    records: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    names = list(POLICIES)
    with torch.no_grad():
        for index, rgb in enumerate(sources()[name]()):
            frame = model.preprocess(rgb).unsqueeze(0)
            reference = model.dense(frame)
            for policy in names if index % 2 == 0 else reversed(names):
                stream = streams[policy]
                start = time.perf_counter()
                output = stream(frame)
                seconds = time.perf_counter() - start
                records[policy].append(
                    {
                        "cosine": feature_cosine(output.tokens, reference.tokens).item(),
                        "macs": stream.ops.total - stream.ops.head,
                        "dense_macs": stream.ops.dense - stream.ops.head_dense,
                        "ms": seconds * 1000,
                    }
                )
    print(name, "done", flush=True)
    return {"source": name, "records": records}


def row(label: str, frames: list[dict], fraction_ms: float) -> list[str]:
    cosines = [f["cosine"] for f in frames]
    ratio = sum(f["dense_macs"] for f in frames) / sum(f["macs"] for f in frames)
    ms = statistics.median(f["ms"] for f in frames)
    return [
        label,
        str(len(frames)),
        f"{ratio:.2f}",
        f"{statistics.fmean(cosines):.4f}",
        f"{min(cosines):.4f}",
        str(sum(c < 0.9 for c in cosines)),
        str(sum(c < 0.85 for c in cosines)),
        f"{ms:.1f}",
        f"{fraction_ms / ms:.2f}",
    ]


def section(results: list[dict], threads: int, jobs: int) -> str:
    registry = [r for r in results if "," not in r["source"] and "every" not in r["source"]]
    groups = {"registry clips": registry, "every source (edits included)": results}
    header = [
        "policy",
        "frames",
        "op ratio",
        "cosine mean",
        "cosine min",
        "frames < 0.9",
        "frames < 0.85",
        "median ms",
        "speedup over fraction:0.25",
    ]
    tables = []
    for title, group in groups.items():
        if not group:
            continue
        frames = {p: [f for r in group for f in r["records"][p]] for p in POLICIES}
        fraction_ms = statistics.median(f["ms"] for f in frames["fraction:0.25"])
        rows = [row(policy, frames[policy], fraction_ms) for policy in POLICIES]
        tables.append(f"#### {title}\n\n" + markdown_table(header, rows))
    per_source = []
    for result in results:
        cells = [result["source"]]
        for policy in POLICIES:
            frames = result["records"][policy]
            cosines = [f["cosine"] for f in frames]
            ratio = sum(f["dense_macs"] for f in frames) / sum(f["macs"] for f in frames)
            cells.append(f"{ratio:.2f} / {statistics.fmean(cosines):.3f} / {min(cosines):.3f}")
        per_source.append(cells)
    source_header = ["source", *(f"{p}: op ratio / mean / min" for p in POLICIES)]
    return (
        "### Spending what the content needs: `Fidelity(target)` against `TopFraction(0.25)`\n\n"
        "Real DINOv2 saliency model, 224x224, exact level, `DEFAULT_DRIFT`, the shipped fidelity "
        "estimate; every source of section safe-defaults. Cosine: mean patch-feature cosine to "
        "the dense model per frame; op ratio: dense over eventful multiply-accumulates of the "
        "encoder over the frames, dense steps included. Time: median step of each policy; the "
        f"policies alternated frame by frame in one process per source ({jobs} sources at "
        f"once, {threads} thread each), so read the ratios, not the milliseconds.\n\n"
        + "\n\n".join(tables)
        + "\n\n#### Per source\n\n"
        + markdown_table(source_header, per_source)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="threads per source")
    parser.add_argument("--jobs", type=int, default=1, help="sources run at once, one process each")
    parser.add_argument("--sources", help="source names separated by semicolons (default: all)")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    names = list(sources()) if args.sources is None else args.sources.split(";")
    jobs = [(name, args.threads) for name in names]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(run_source, jobs)
    write_or_print("fidelity-policy", section(results, args.threads, args.jobs), args.write)


if __name__ == "__main__":
    main()
