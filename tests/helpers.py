"""Shared builders for the tests."""

import contextlib
import io
from dataclasses import dataclass

import torch

import eventful

LEVELS = ("tokenwise", "qk", "full", "exact")

# Every block variant the canonical ViT has: plain, LayerScale, registers, no qkv bias.
VARIANTS = {
    "plain": {},
    "layer_scale": {"layer_scale_init": 0.3},
    "registers": {"num_registers": 2},
    "no_qkv_bias": {"qkv_bias": False},
}


def tiny_vit(seed: int = 0, **options) -> eventful.ViT:
    """A small ViT (64x64 input, 8x8 patches: 1 + 64 tokens) with random weights."""
    torch.manual_seed(seed)
    config = {"image_size": 64, "patch_size": 8, "dim": 48, "depth": 3, "heads": 4}
    config.update(options)
    return eventful.ViT(**config).eval()


def max_difference_to_dense(vit, policy, level, video) -> float:
    """Largest absolute difference of an eventful stream's outputs from the dense model's, over
    a video (T, B, 3, H, W)."""
    stream = eventful.convert(vit, policy=policy, level=level).stream(batch_size=video.shape[1])
    worst = 0.0
    with torch.no_grad():
        for frame in video:
            worst = max(worst, (stream(frame) - vit(frame)).abs().max().item())
    return worst


@dataclass
class Outcome:
    code: int
    out: str
    err: str


class TerminalText(io.StringIO):
    """A text stream that says it is a terminal, as a tty does."""

    def isatty(self) -> bool:
        return True


def invoke(*argv, terminal: bool = False) -> Outcome:
    """`eventful ARGV` in this process: exit code, stdout and stderr (which claim to be a
    terminal when `terminal`)."""
    from eventful.cli import main

    stream = TerminalText if terminal else io.StringIO
    out, err = stream(), stream()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit_:  # argparse errors exit instead of returning
            code = exit_.code
    return Outcome(code, out.getvalue(), err.getvalue())


def assert_one_line_error(outcome: Outcome, code: int, fragment: str) -> None:
    assert outcome.code == code, outcome
    assert "Traceback" not in outcome.err
    lines = outcome.err.splitlines()
    assert len(lines) == 1, outcome.err
    assert lines[0].startswith("eventful: error: "), lines[0]
    assert fragment in lines[0]
