"""How long `eventful demo` takes, as a new user runs it: the default 40 frames and, with
--all-frames, the whole clip. Each run is a fresh process (model loading, decoding, both models,
the report, plot and side-by-side video included); the runs of the two commands alternate.
Writes the `demo-time` section of BENCHMARKS.md.

    python benchmarks/demo_time.py --repeats 3 --write
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

from report import markdown_table, write_or_print

COMMANDS = {"eventful demo": [], "eventful demo --all-frames": ["--all-frames"]}


def run_demo(options: list[str], threads: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        argv = [sys.executable, "-m", "eventful.cli", "demo", "--output", folder]
        argv += ["--threads", str(threads), *options]
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    seconds = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, options in COMMANDS.items():
            seconds[name].append(run_demo(options, args.threads))
            print(f"{name}: {seconds[name][-1]:.0f} s", flush=True)
    rows = [
        [f"`{name} --threads {args.threads}`", f"{statistics.median(times):.0f}", len(times)]
        for name, times in seconds.items()
    ]
    body = (
        "### How long the demo takes\n\n"
        "Wall time of the whole command in a fresh process: loading the model, decoding, the "
        "eventful and the dense model on every frame, and writing the report, plot and "
        "side-by-side video. Median over the runs; the two commands alternate.\n\n"
        + markdown_table(["command", "seconds (median)", "runs"], rows)
    )
    write_or_print("demo-time", body, args.write)


if __name__ == "__main__":
    main()
