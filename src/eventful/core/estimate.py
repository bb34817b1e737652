"""A stream that knows its own error: an estimate of each step's cosine similarity to the dense
model, computed from what the gates left unprocessed, without running the dense model.

Every gate measures its *unprocessed share* (`eventful.core.gates`): the change it did not pass
on, as a share of its input's size. Their mean over the gates, u (`StepTrace.unprocessed_share`),
is 0 on a dense step and grows with every token left stale. The estimate maps it to a cosine,

    estimated cosine = 1 - a * u ** p,

with a and p fitted once per model on real frames (`calibrate_fidelity_estimate`): p by least
squares of log(1 - cosine) on log u, a raised until the estimate is pessimistic on a chosen share
of the calibration frames (`quantile`), so that it errs on the side of caution. A calibration
holds for the weights it was fitted on (their fingerprint) and the attention levels it ran.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from eventful.core.fingerprint import model_fingerprint
from eventful.core.ops import StepTrace

# Frames closer to dense than this (1 - cosine) carry no information for the fit: rounding.
_FIT_FLOOR = 1e-6


@dataclass(frozen=True)
class FidelityEstimate:
    """A calibrated map from the mean unprocessed share u to an estimated cosine, 1 - a u^p.

    fingerprint: `model_fingerprint` of the eventful encoder it was fitted on; levels: the
    attention level of each block during calibration; frames: calibration frames used;
    quantile: the share of calibration frames on which the estimate is not optimistic.
    """

    coefficient: float
    exponent: float
    fingerprint: str
    levels: tuple[str, ...]
    frames: int
    quantile: float

    def cosine(self, share: Tensor) -> Tensor:
        """Estimated cosine per stream (B,) for mean unprocessed shares (B,)."""
        return (1 - self.coefficient * share.double().clamp_min(0) ** self.exponent).clamp(-1, 1)

    def estimate(self, trace: StepTrace) -> list[float]:
        """Per stream, the estimated cosine of a traced step."""
        return self.cosine(trace.unprocessed_share).tolist()

    def check(self, encoder: torch.nn.Module, levels: Sequence[str]) -> None:
        """Raise ValueError unless this calibration fits `encoder` (the eventful encoder of a
        converted model) and its attention `levels`."""
        fingerprint = model_fingerprint(encoder)
        if fingerprint != self.fingerprint:
            raise ValueError(
                f"this fidelity estimate was calibrated for the model with fingerprint "
                f"{self.fingerprint}, not for this one ({fingerprint}); calibrate it for this "
                "model with calibrate_fidelity_estimate"
            )
        if tuple(levels) != self.levels:
            raise ValueError(
                f"this fidelity estimate was calibrated at levels {sorted(set(self.levels))}, "
                f"but the model runs {sorted(set(levels))}; calibrate it at these levels"
            )

    def save(self, path: str | Path) -> None:
        """Write the calibration as JSON."""
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FidelityEstimate:
        """Read a calibration written by `save`."""
        fields = json.loads(Path(path).read_text())
        fields["levels"] = tuple(fields["levels"])
        return cls(**fields)


def fit_fidelity_estimate(
    shares: Sequence[float],
    cosines: Sequence[float],
    fingerprint: str,
    levels: Sequence[str],
    quantile: float = 0.9,
) -> FidelityEstimate:
    """Fit 1 - cosine = a u^p to measured (share u, cosine) pairs of eventful steps.

    p comes from least squares in log space over the steps that left something unprocessed;
    a is then set so that the estimate is at most the measured cosine on `quantile` of them.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile!r}")
    points = [
        (math.log(u), math.log(1 - c))
        for u, c in zip(shares, cosines, strict=True)
        if u > 0 and 1 - c > _FIT_FLOOR
    ]
    if len(points) < 2:
        raise ValueError(
            f"expected at least 2 steps that left change unprocessed to fit on, got {len(points)}"
        )
    logs_u = torch.tensor([u for u, _ in points], dtype=torch.float64)
    logs_error = torch.tensor([e for _, e in points], dtype=torch.float64)
    centred = logs_u - logs_u.mean()
    exponent = float((centred * (logs_error - logs_error.mean())).sum() / centred.square().sum())
    exponent = max(exponent, 1e-3)  # more unprocessed change never raises the estimate
    offsets = logs_error - exponent * logs_u
    coefficient = math.exp(float(torch.quantile(offsets, quantile)))
    return FidelityEstimate(
        coefficient, exponent, fingerprint, tuple(levels), len(points), float(quantile)
    )
