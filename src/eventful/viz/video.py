"""A video of each frame, the tokens re-processed in it, and the model's saliency map."""

from __future__ import annotations

import functools
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from eventful.video.runner import FrameView
from eventful.zoo import ZooModel

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi")  # containers that take H.264 and MPEG-4


def colourise(values: Tensor, colormap: str = "inferno") -> np.ndarray:
    """Values (H, W) in [0, 1] -> RGB (H, W, 3) uint8."""
    levels = np.rint(np.clip(values.detach().float().cpu().numpy(), 0, 1) * 255).astype(np.uint8)
    return _lookup(colormap)[levels]


@functools.cache
def _lookup(colormap: str) -> np.ndarray:
    """The 256 RGB colours (256, 3) uint8 of a matplotlib colormap, built once: building it
    per call and indexing floats took two thirds of the time the side-by-side video spent."""
    import matplotlib

    colours = matplotlib.colormaps[colormap](np.linspace(0, 1, 256))[:, :3]
    return (colours * 255).round().astype(np.uint8)


def update_map(updated_tokens: Tensor, prefix: int, grid: tuple[int, int], size: int) -> Tensor:
    """Per-token update fractions (T,) -> a (size, size) map over the patch grid."""
    patches = updated_tokens[prefix:].reshape(1, 1, *grid)
    return F.interpolate(patches, size=(size, size), mode="nearest")[0, 0]


class SideBySideWriter:
    """Writes frames of three panels: the input, the updated tokens over it, the saliency map."""

    def __init__(self, path: str | Path, size: int, fps: float) -> None:
        import av

        self.size = size + size % 2  # yuv420p needs even sides
        self._container = av.open(str(path), mode="w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._stream = self._container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        self._stream.width = 3 * self.size
        self._stream.height = self.size
        self._stream.pix_fmt = "yuv420p"

    def write(self, image: np.ndarray, updated: Tensor, saliency: Tensor | None) -> None:
        """image (S, S, 3) uint8, updated (S, S) in [0, 1], saliency (S, S) in [0, 1] or None."""
        import av

        heat = colourise(updated)
        overlay = (0.45 * image + 0.55 * heat).astype(np.uint8)
        third = colourise(saliency) if saliency is not None else np.zeros_like(image)
        panels = np.concatenate([image, overlay, third], axis=1)
        height, width = panels.shape[:2]
        canvas = np.zeros((self.size, 3 * self.size, 3), dtype=np.uint8)
        canvas[:height, :width] = panels
        frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()


class RunVisualiser:
    """The per-frame callback of a video run that writes the side-by-side video."""

    def __init__(self, path: str | Path, model: ZooModel, fps: float) -> None:
        self.path = path
        self.model = model
        self.fps = fps
        side = model.input_size // model.patch_size
        self.grid = (side, side)
        self.writer: SideBySideWriter | None = None

    def __call__(self, view: FrameView) -> None:
        if self.writer is None:
            self.writer = SideBySideWriter(self.path, self.model.input_size, self.fps)
        size = self.model.input_size
        updated = update_map(view.updated_tokens, self.model.num_prefix_tokens, self.grid, size)
        saliency = None if view.saliency is None else view.saliency.cpu()
        self.writer.write(self.model.display(view.image), updated, saliency)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
