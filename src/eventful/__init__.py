"""eventful: vision transformers that re-process only what changed between frames."""

from eventful.convert import convert
from eventful.core.budget import LatencyBudget, OpsBudget
from eventful.core.drift import DEFAULT_DRIFT, DriftControl, DriftEvent
from eventful.core.error_bound import ErrorBound
from eventful.core.fidelity_policy import Fidelity
from eventful.core.model import EventfulViT
from eventful.core.ops import OpCount
from eventful.core.policies import Policy, Threshold, TopFraction, TopK
from eventful.core.staleness import MaxAge
from eventful.core.state import StreamState
from eventful.core.stream import Stream
from eventful.models.vit import ViT
from eventful.models.vitdet import ViTDet

__all__ = [
    "DEFAULT_DRIFT",
    "DriftControl",
    "DriftEvent",
    "ErrorBound",
    "EventfulViT",
    "Fidelity",
    "LatencyBudget",
    "MaxAge",
    "OpCount",
    "OpsBudget",
    "Policy",
    "Stream",
    "StreamState",
    "Threshold",
    "TopFraction",
    "TopK",
    "ViT",
    "ViTDet",
    "convert",
]
