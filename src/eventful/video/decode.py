"""Streaming decode with PyAV: one RGB frame at a time, never the whole video in memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


def decode_frames(path: str | Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """RGB frames (H, W, 3) uint8 of the first video stream of `path`, in order."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for count, frame in enumerate(container.decode(stream)):
            if max_frames is not None and count >= max_frames:
                return
            yield frame.to_ndarray(format="rgb24")
