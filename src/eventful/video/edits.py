"""Edits of real clips that stress an eventful stream: what broadcast and handheld video does.

Frames are RGB arrays (H, W, 3) uint8, as `decode_frames` yields them; every edit returns a new
list and leaves its input alone. Used to measure drift control on the registry clips
(benchmarks/safe_defaults.py) and to test it; try them on your own clips.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def solid(like: np.ndarray, value: int | tuple[int, int, int] = 0) -> np.ndarray:
    """A frame of one colour (0: black, 255: white) with the shape of `like`."""
    frame = np.empty_like(like)
    frame[...] = np.asarray(value, dtype=np.uint8)
    return frame


def faint(frame: np.ndarray, contrast: float) -> np.ndarray:
    """`frame` with its contrast scaled by `contrast` around its mean (0.05: a faint frame)."""
    pixels = frame.astype(np.float32)
    mean = pixels.mean(axis=(0, 1), keepdims=True)
    return np.clip(mean + contrast * (pixels - mean), 0, 255).round().astype(np.uint8)


def dimmed(frame: np.ndarray, level: float) -> np.ndarray:
    """`frame` faded towards black: pixel values times `level` in [0, 1]."""
    return np.clip(frame.astype(np.float32) * level, 0, 255).round().astype(np.uint8)


def title_card(like: np.ndarray, seed: int = 0) -> np.ndarray:
    """White lines of block letters on black: a title card the size of `like`."""
    generator = np.random.default_rng(seed)
    card = np.zeros_like(like)
    height, width = like.shape[:2]
    glyph = max(2, height // 24)
    for row in range(2):
        top = height // 3 + row * 3 * glyph
        left = width // 5
        while left < 4 * width // 5:
            if generator.random() < 0.8:
                card[top : top + 2 * glyph, left : left + glyph] = 235
            left += int(glyph * 1.5)
    return card


def with_lead_in(frames: Sequence[np.ndarray], lead: Sequence[np.ndarray]) -> list[np.ndarray]:
    """`lead` frames (black, a title card, ...) followed by the clip."""
    return [*lead, *frames]


def with_fade_through_black(
    frames: Sequence[np.ndarray], start: int, length: int
) -> list[np.ndarray]:
    """From frame `start`, a fade to black over `length` frames and back over `length` frames
    (the clip's own frames keep playing underneath)."""
    edited = list(frames)
    for offset in range(2 * length + 1):
        index = start + offset
        if index >= len(edited):
            break
        level = abs(offset - length) / length
        edited[index] = dimmed(edited[index], level)
    return edited


def with_flash(frames: Sequence[np.ndarray], at: int, value: int = 255) -> list[np.ndarray]:
    """Frame `at` replaced by a frame of one colour (a flash: white by default)."""
    edited = list(frames)
    edited[at] = solid(edited[at], value)
    return edited


def with_jump(frames: Sequence[np.ndarray], at: int, pixels: int) -> list[np.ndarray]:
    """From frame `at` on, the content jumps `pixels` to the left (a camera that jerks): the
    frame is shifted and its right edge repeated."""
    edited = list(frames)
    for index in range(at, len(edited)):
        frame = edited[index]
        shifted = np.concatenate([frame[:, pixels:], np.repeat(frame[:, -1:], pixels, 1)], 1)
        edited[index] = shifted
    return edited


def spliced(clips: Sequence[Sequence[np.ndarray]], every: int) -> list[np.ndarray]:
    """Hard cuts every `every` frames, cycling through `clips` (each resized to the first
    clip's frame size), until the shortest clip runs out."""
    height, width = clips[0][0].shape[:2]
    sized = [[resized(frame, height, width) for frame in clip] for clip in clips]
    length = min(len(clip) for clip in sized)
    return [sized[(index // every) % len(sized)][index] for index in range(length)]


def resized(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """`frame` resized (bilinear) to height x width pixels."""
    if frame.shape[:2] == (height, width):
        return frame
    pixels = torch.from_numpy(frame).permute(2, 0, 1).unsqueeze(0).float()
    pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)
    return pixels[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()
