"""Shared builders for the tests, and the tolerance that says what "the same" means.

What the library guarantees (README, "What is exact"):

- Bit for bit (`torch.equal`) where every op runs on the same shapes: the same batch of streams
  run twice on the same frames, a restored snapshot continuing, a rejected call followed by the
  next step.
- Within `ROUNDING_TOLERANCE` where the shapes differ: a stream whose batch-mates run other work
  (a refresh, a reset, a scene cut, other selection counts), and a batch of streams against the
  same streams run one by one. The selected rows of all streams of a batch go through one
  matmul, and matrix kernels round differently for different row counts, and on different CPUs.
"""

import contextlib
import io
import math
from dataclasses import dataclass

import torch

import eventful
from eventful.core import kernels
from eventful.core.policies import Policy
from eventful.core.selection import Selection

LEVELS = ("tokenwise", "qk", "full", "exact")

# Every block variant the canonical ViT has: plain, LayerScale, registers, no qkv bias.
VARIANTS = {
    "plain": {},
    "layer_scale": {"layer_scale_init": 0.3},
    "registers": {"num_registers": 2},
    "no_qkv_bias": {"qkv_bias": False},
    "no_prefix_tokens": {"class_token": False},
    "registers_only": {"class_token": False, "num_registers": 2},
}

# The largest difference allowed between runs whose shapes differ: absolute on values of order 1
# (the final-norm outputs), relative beyond (caches such as attention denominators). Measured in
# the tests that use it, on an Intel Xeon: at most 1.2e-6, and 0 where the row counts happen to
# round alike; in 2 of 20 runs of a batch against single streams at the full level (whose
# cached attention-value product carries rounding from step to step) on a busy machine, 1.5e-5
# and 3.7e-5. 1e-4 leaves room for other CPUs.
ROUNDING_TOLERANCE = 1e-4

# Rounding moves the gate errors as well (by at most 4.8e-7 in the same tests), and a selection
# is not continuous in them: where the k-th and (k+1)-th largest errors are closer than that,
# or an error is that close to a threshold, rounding alone swaps a token, and the stream then
# differs by a whole token's change, far beyond any tolerance. Random inputs have such near
# ties by chance: over the 270 selections of a batch of three streams for 10 frames (TopK(12)),
# the smallest gap at the k-th place was below 1e-5 for 10 of 11 seeds, and below 2e-6 (at
# errors of about 0.2) for 5 of them. So the tests that compare across shapes run on inputs
# whose every decision clears SELECTION_MARGIN, 20 times the largest movement measured, and
# check that they do (`MarginRecorder`); their margins are 1.4e-5 and more.
SELECTION_MARGIN = 1e-5


def assert_equal_up_to_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """`got` equals `want` within `ROUNDING_TOLERANCE`: the guarantee across shapes."""
    torch.testing.assert_close(got, want, atol=ROUNDING_TOLERANCE, rtol=ROUNDING_TOLERANCE)


class MarginRecorder(Policy):
    """`policy` (a `TopK` or a `Threshold` without bounds), recording at every gate how far the
    error norms were from changing its selection; `margin` is the smallest so far.

    Under `TopK(k)`: the gap between each stream's k-th and (k+1)-th largest error. Exactly equal
    errors are not a near tie: they come from tokens that did not change at all (error 0) or
    from `MaxAge`'s age scores, and are equal in every run. Under `Threshold(t)`: the distance of
    the error nearest t.
    """

    def __init__(self, policy: Policy) -> None:
        if not isinstance(policy, (eventful.TopK, eventful.Threshold)):
            raise TypeError(f"MarginRecorder wraps TopK or Threshold, got {policy!r}")
        self.policy = policy
        self.norm = policy.norm
        self.margin = math.inf

    def validate(self, num_tokens: int, blocks=None) -> None:
        self.policy.validate(num_tokens, blocks)

    def select(self, error_norms: torch.Tensor) -> Selection:
        if isinstance(self.policy, eventful.Threshold):
            margins = (error_norms - self.policy.threshold).abs().flatten()
        elif self.policy.k < error_norms.shape[1]:
            largest = error_norms.topk(self.policy.k + 1, dim=1).values
            margins = largest[:, -2] - largest[:, -1]
            margins = margins[margins > 0]
        else:
            margins = torch.empty(0)
        if margins.numel():
            self.margin = min(self.margin, margins.min().item())
        return self.policy.select(error_norms)

    def __repr__(self) -> str:
        return f"MarginRecorder({self.policy!r})"


@contextlib.contextmanager
def kernel_calls(name: str, use: bool = True):
    """Within it, `kernels.<name>()` hands out the kernel counting its calls (one item per call
    in the list it yields) or, with `use` false, None: the callers take PyTorch's operators."""
    calls = []
    real = getattr(kernels, name)

    def counted():
        kernel = real()
        return lambda *args: calls.append(1) or kernel(*args)

    setattr(kernels, name, counted if use else (lambda: None))
    try:
        yield calls
    finally:
        setattr(kernels, name, real)


def two_streams_over(level: str, policy: Policy, frames: list[torch.Tensor]):
    """Outputs of a small ViT's two streams at `level` over `frames` (2, 3, 48, 48), run under
    the caller's grad mode, without drift control; and the stream."""
    torch.manual_seed(0)
    vit = eventful.ViT(image_size=48, patch_size=8, dim=48, depth=2, heads=3).eval()
    stream = eventful.convert(vit, policy=policy, level=level).stream(2, drift=None)
    return [stream(frame) for frame in frames], stream


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


class SelectionRecorder(Policy):
    """`policy`, recording each selection it makes, call by call (one call per gate that
    selects), so that `SelectionReplay` can make the same decisions in another run."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.norm = policy.norm
        self.selections: list[tuple[torch.Tensor, ...]] = []

    def validate(self, num_tokens: int, blocks=None) -> None:
        self.policy.validate(num_tokens, blocks)

    def select(self, error_norms: torch.Tensor) -> Selection:
        selection = self.policy.select(error_norms)
        self.selections.append(selection.per_stream)
        return selection


class SelectionReplay(Policy):
    """Selects, call by call, what stream `stream` of a recorded run selected: a single stream
    then takes the batch's decisions, whatever rounding does to its errors near a tie."""

    def __init__(self, recorder: SelectionRecorder, stream: int) -> None:
        self.recorded = [per_stream[stream] for per_stream in recorder.selections]
        self.norm = recorder.norm
        self.calls = 0

    def select(self, error_norms: torch.Tensor) -> Selection:
        index = self.recorded[self.calls]
        self.calls += 1
        return Selection.from_lists([index], error_norms.shape[1])
