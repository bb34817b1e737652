"""Streaming decode with PyAV: one RGB frame at a time, never the whole video in memory.

Any container and codec that the ffmpeg inside PyAV decodes. Packets that fail to decode and
frames the decoder flags as corrupt are skipped and counted; decoding goes on after them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


class VideoError(Exception):
    """A video that cannot be read at all; the message is one line for the user."""


class VideoReader:
    """RGB frames (H, W, 3) uint8 of the first video stream of `path`, in order.

    `frames_failed` counts the frames lost to corrupted data so far; `stopped_early` holds a
    message when the container itself broke off before its end.
    """

    def __init__(self, path: str | Path, max_frames: int | None = None) -> None:
        import av

        self.path = Path(path)
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        if not self.path.exists():
            raise VideoError(f"no such file: {self.path}")
        if not self.path.is_file():
            raise VideoError(f"not a file: {self.path}")
        try:
            self._container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError) as error:
            raise VideoError(f"cannot read {self.path} as a video: {_reason(error)}") from None
        if not self._container.streams.video:
            self._container.close()
            raise VideoError(f"{self.path} has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        self.max_frames = max_frames
        self.frames_failed = 0
        self.stopped_early: str | None = None

    @property
    def fps(self) -> float:
        rate = self._stream.average_rate or self._stream.guessed_rate
        return float(rate) if rate else 25.0

    @property
    def frame_count(self) -> int | None:
        """At most how many frames this reader delivers: the frame count of the container's
        video stream (failed frames included), capped by `max_frames`; None where neither is
        known (the container does not say: raw streams, Matroska)."""
        count = self._stream.frames or None
        if self.max_frames is None:
            return count
        return self.max_frames if count is None else min(count, self.max_frames)

    def close(self) -> None:
        self._container.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        import av

        delivered = 0
        try:
            for packet in self._container.demux(self._stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    self.frames_failed += 1
                    continue
                for frame in frames:
                    if frame.is_corrupt:
                        self.frames_failed += 1
                        continue
                    yield frame.to_ndarray(format="rgb24")
                    delivered += 1
                    if self.max_frames is not None and delivered >= self.max_frames:
                        return
        except av.error.FFmpegError as error:
            self.stopped_early = f"decoding stopped after {delivered} frames: {_reason(error)}"
        finally:
            self._container.close()


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)


def decode_frames(path: str | Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """RGB frames (H, W, 3) uint8 of the first video stream of `path`, in order."""
    yield from VideoReader(path, max_frames)
