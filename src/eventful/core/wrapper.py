"""Eventful models whose encoder sits inside a larger model (a head, a decoder, an output type).

The wrapped model is a copy of the user's model in which the encoder module is replaced by an
`EncoderCall`. Each step, `EventfulWrapper` hands the stream state to that call for the duration
of one forward pass of the copy, so the user's own forward code (heads, pooling, output types)
runs unchanged on the eventful encoder's tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from eventful.core.escalation import Escalation
from eventful.core.model import EventfulModule, EventfulViT
from eventful.core.ops import StepTrace
from eventful.core.policies import Policy
from eventful.core.state import StreamState


class EncoderCall(nn.Module):
    """Stands in for an encoder: pixel values -> `format_output(tokens)`, stepping the state.

    `format_output` turns final-norm tokens (B, T, D) into what the replaced encoder returned.
    Keyword arguments are checked by `check_arguments`, which raises on options the eventful
    encoder cannot honour.
    """

    def __init__(
        self,
        encoder: EventfulViT,
        format_output: Callable[[Tensor], Any],
        check_arguments: Callable[[dict], None],
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.format_output = format_output
        self.check_arguments = check_arguments
        self._step: dict | None = None

    def forward(self, pixel_values: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if self._step is None:
            raise RuntimeError(
                "this eventful encoder runs only inside a step of its EventfulWrapper "
                "(call the converted model or its stream, not the inner module)"
            )
        if args:
            raise TypeError(
                f"the eventful encoder takes pixel values and keyword options, got {len(args)} "
                "more positional arguments"
            )
        if pixel_values is None:
            pixel_values = kwargs.pop("pixel_values", None)
        self.check_arguments(kwargs)
        if self._step["called"]:
            raise RuntimeError(
                "the wrapped model called its encoder twice in one step; an eventful encoder "
                "advances its streams once per call"
            )
        self._step["called"] = True
        tokens = self.encoder(pixel_values, **self._step["arguments"])
        return self.format_output(tokens)


class EventfulWrapper(EventfulModule):
    """A converted model whose encoder is eventful: frames + state -> the model's own output.

    If the wrapped model fails after its encoder has stepped (its head raises, or it calls the
    encoder a second time), every stream of the state is reset: its next step runs densely.

    `model` is the copy of the user's model that holds the `EncoderCall` at `call_path`
    ("" when the encoder is the whole model).
    """

    def __init__(self, model: nn.Module, call_path: str) -> None:
        super().__init__()
        self.model = model
        self.call_path = call_path

    @property
    def call(self) -> EncoderCall:
        return self.model.get_submodule(self.call_path)

    @property
    def encoder(self) -> EventfulViT:
        return self.call.encoder

    @property
    def policy(self) -> Policy:
        return self.encoder.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.encoder.policy = policy

    def forward(
        self,
        frames: Tensor,
        state: StreamState,
        trace: StepTrace | None = None,
        check_finite: bool = True,
        refresh: Sequence[int] = (),
        escalation: Escalation | None = None,
    ) -> Any:
        """One time step; the arguments are those of `EventfulViT.forward`."""
        call = self.call
        arguments = {
            "state": state,
            "trace": trace,
            "check_finite": check_finite,
            "refresh": refresh,
            "escalation": escalation,
        }
        call._step = {"arguments": arguments, "called": False}
        try:
            output = self.model(frames)
            if not call._step["called"]:
                raise RuntimeError("the wrapped model did not call its encoder")
        except Exception:
            if call._step["called"]:
                # The encoder stepped, then the wrapped model failed: the caller never saw
                # this step complete, so drop the caches rather than keep a half-done step.
                state.reset()
            raise
        finally:
            call._step = None
        return output
