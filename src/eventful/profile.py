"""Where the time of a run goes, part by part: what `eventful run --profile` prints.

The engine and the video runner mark their parts with `part(name)`; while a `Profile` is
active (`with Profile() as profile:`) each part's wall time is added up, otherwise `part` does
nothing but check one global. Times are host wall-clock: on CUDA they include no wait for the
device except where a part synchronises itself.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

# The parts, in the order of a frame's life, with what each covers.
PARTS = {
    "decode": "decoding the frame from the video",
    "preprocess": "resizing and normalising it into the model's input",
    "drift": "drift-control checks (scene cuts, content changes)",
    "encoder": "the eventful encoder (gates, token-wise layers, attention)",
    "head": "the head on the encoder's tokens (the model minus its encoder)",
    "count": "op counting",
    "estimate": "the fidelity estimate",
    "dense": "the dense model (with --compare)",
}

_active: Profile | None = None


@contextmanager
def part(name: str) -> Iterator[None]:
    """Adds the wall time of the block to `name` in the active profile, if any."""
    if _active is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        _active.add(name, time.perf_counter() - start)


class Profile:
    """Seconds per part, summed while active (one at a time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def __enter__(self) -> Profile:
        global _active
        if _active is not None:
            raise RuntimeError("a profile is already active")
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        _active = None

    def table(self, frames: int) -> str:
        """Milliseconds per frame of each part, and the eventful frame's total."""
        seconds = dict(self.seconds)
        model = seconds.pop("model", 0.0)
        if "encoder" in seconds:
            seconds["head"] = max(model - seconds["encoder"], 0.0)
        else:
            seconds["encoder"] = model  # a bare encoder: the model is the encoder
        eventful = ("drift", "encoder", "head", "count", "estimate")
        total = sum(seconds.get(name, 0.0) for name in eventful)
        rows = [("part", "ms / frame", "share", "what")]
        for name, meaning in PARTS.items():
            if name not in seconds:
                continue
            value = seconds[name]
            share = f"{value / total:.0%}" if name in eventful and total else ""
            rows.append((name, f"{1000 * value / frames:.1f}", share, meaning))
        rows.append(
            ("eventful frame", f"{1000 * total / frames:.1f}", "100%", "the shares above, summed")
        )
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        return "\n".join(
            "  ".join(
                [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2]), row[3]]
            ).rstrip()
            for row in rows
        )
