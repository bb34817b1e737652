"""Per-stream caches of an eventful model, kept apart from its weights."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def _stream_index(value: object) -> int:
    """An integer stream index; numpy and torch integers are accepted, booleans are not."""
    if isinstance(value, bool):
        raise TypeError(f"stream indices must be integers, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"stream indices must be integers, got {value!r}") from None


class StreamState:
    """The caches of a batch of B independent streams for one eventful model.

    Holds, per block, the gate references, token buffers and attention caches (all with a
    leading batch dimension), the caches of an eventful head (`heads`: per stack, positions of
    all streams in rows), the input size they were built for, and which streams are
    *fresh*: reset or never run, so their next step runs densely and refills their caches.
    Tensors are allocated on the first step, on the frames' device.
    """

    def __init__(self, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.fresh = [True] * batch_size
        self.input_size: tuple[int, int] | None = None
        self.blocks: list[dict[str, Tensor]] = []
        # Per eventful head stack (`eventful.core.local_head`), its caches; filled by its steps.
        self.heads: dict[str, dict[str, Tensor]] = {}
        # The operands of the last step of the blocks in one call, and what they were made from
        # (`eventful.core.block.KeptOperands`): not part of the state, never copied or saved.
        self.kept_operands: object | None = None

    def __getstate__(self) -> dict:
        # Copies and pickles make their operands anew: the kept ones hold the model's weights.
        return {**self.__dict__, "kept_operands": None}

    def __setstate__(self, state: dict) -> None:
        state.setdefault("kept_operands", None)  # states pickled before operands were kept
        self.__dict__.update(state)

    @property
    def allocated(self) -> bool:
        return bool(self.blocks)

    @property
    def device(self) -> torch.device | None:
        return self.blocks[0]["qkv"].device if self.blocks else None

    @property
    def dtype(self) -> torch.dtype | None:
        """The steps' dtype (the qkv buffer may hold a lower one: `EventfulBlock._qkv_dtype`)."""
        return self.blocks[0]["qkv_reference"].dtype if self.blocks else None

    def fresh_streams(self) -> list[int]:
        return [stream for stream, fresh in enumerate(self.fresh) if fresh]

    def allocate(
        self,
        specs: list[dict[str, tuple[tuple[int, ...], torch.dtype]]],
        input_size: tuple[int, int],
        device: torch.device,
    ) -> None:
        """(Re)build every cache, zero-filled, for inputs of `input_size` (H, W) pixels.

        specs: per block, each tensor's name, shape and dtype."""
        self.kept_operands = None
        self.blocks = [
            {
                name: torch.zeros(shape, dtype=dtype, device=device)
                for name, (shape, dtype) in block.items()
            }
            for block in specs
        ]
        self.input_size = input_size

    def reset(self, streams: Iterable[int] | None = None) -> None:
        """Mark all streams, or the given ones, fresh; the others keep their caches untouched."""
        if streams is None:
            self.fresh = [True] * self.batch_size
            return
        chosen = [_stream_index(stream) for stream in streams]
        for stream in chosen:
            if not 0 <= stream < self.batch_size:
                raise IndexError(
                    f"stream index {stream} out of range for a batch of {self.batch_size} streams"
                )
        for stream in chosen:
            self.fresh[stream] = True

    def ensure_writable(self) -> None:
        """Outside `torch.inference_mode`, replace the caches made inside it (inference tensors,
        which only inference mode may update in place) by ordinary copies, once: a stream may
        move between grad modes from step to step."""
        if torch.is_inference_mode_enabled():
            return
        for caches in [*self.blocks, *self.heads.values()]:  # in place: steps hold these dicts
            for name, tensor in caches.items():
                if tensor.is_inference():
                    caches[name] = tensor.clone()

    def mark_processed(self) -> None:
        self.fresh = [False] * self.batch_size

    def to(self, device: torch.device | str) -> StreamState:
        """Move every cache to `device`, in place; returns self."""
        self.kept_operands = None
        self.blocks = [
            {name: tensor.to(device) for name, tensor in block.items()} for block in self.blocks
        ]
        self.heads = {
            stack: {name: tensor.to(device) for name, tensor in caches.items()}
            for stack, caches in self.heads.items()
        }
        return self

    def nbytes(self) -> int:
        """Bytes held by all caches of all streams."""
        caches = [*self.blocks, *self.heads.values()]
        return sum(t.numel() * t.element_size() for block in caches for t in block.values())

    def nbytes_per_stream(self) -> int:
        return self.nbytes() // self.batch_size

    def state_dict(self) -> dict:
        """A snapshot (copied tensors) that `load_state_dict` or `torch.save` accept."""
        return {
            "batch_size": self.batch_size,
            "fresh": list(self.fresh),
            "input_size": self.input_size,
            "blocks": [{name: t.clone() for name, t in block.items()} for block in self.blocks],
            "heads": {
                stack: {name: t.clone() for name, t in caches.items()}
                for stack, caches in self.heads.items()
            },
        }

    def load_state_dict(self, snapshot: dict) -> None:
        """Restore a snapshot from `state_dict`; the stream continues exactly where it was."""
        if snapshot["batch_size"] != self.batch_size:
            raise ValueError(
                f"snapshot holds {snapshot['batch_size']} streams, expected {self.batch_size}"
            )
        self.fresh = list(snapshot["fresh"])
        self.kept_operands = None
        self.input_size = None if snapshot["input_size"] is None else tuple(snapshot["input_size"])
        self.blocks = [
            {name: t.clone() for name, t in block.items()} for block in snapshot["blocks"]
        ]
        self.heads = {
            stack: {name: t.clone() for name, t in caches.items()}
            for stack, caches in snapshot.get("heads", {}).items()
        }

    def take(self, streams: Sequence[int]) -> StreamState:
        """A new state with copies of the caches of `streams`, in that order: cameras leaving
        a batch. This state is left as it was."""
        chosen = [_stream_index(stream) for stream in streams]
        if not chosen:
            raise ValueError("take needs at least one stream")
        for stream in chosen:
            if not 0 <= stream < self.batch_size:
                raise IndexError(
                    f"stream index {stream} out of range for a batch of {self.batch_size} streams"
                )
        taken = StreamState(len(chosen))
        taken.fresh = [self.fresh[stream] for stream in chosen]
        taken.input_size = self.input_size

        def rows(tensor: Tensor) -> Tensor:
            per = tensor.shape[0] // self.batch_size  # attention groups, head positions
            index = torch.tensor(
                [stream * per + row for stream in chosen for row in range(per)],
                device=tensor.device,
            )
            return tensor.index_select(0, index)

        taken.blocks = [{name: rows(t) for name, t in block.items()} for block in self.blocks]
        taken.heads = {
            stack: {name: rows(t) for name, t in caches.items()}
            for stack, caches in self.heads.items()
        }
        return taken

    @staticmethod
    def cat(states: Sequence[StreamState]) -> StreamState:
        """One state holding the streams of `states`, in order: cameras joining a batch.

        States never run (nothing allocated) join as fresh streams. Allocated states must share
        the input size, dtype and device. A head's caches are kept only if every state has
        them; otherwise that head runs densely on the next step."""
        if not states:
            raise ValueError("cat needs at least one stream state")
        allocated = [state for state in states if state.allocated]
        joined = StreamState(sum(state.batch_size for state in states))
        joined.fresh = [fresh for state in states for fresh in state.fresh]
        if not allocated:
            return joined
        sizes = {state.input_size for state in allocated}
        kinds = {(state.dtype, state.device) for state in allocated}
        if len(sizes) > 1 or len(kinds) > 1:
            raise ValueError(
                f"streams of different input sizes, dtypes or devices cannot share a batch: "
                f"{sorted(str(size) for size in sizes)}, {sorted(str(kind) for kind in kinds)}"
            )
        template = allocated[0]

        def per_stream(tensor: Tensor, batch: int) -> int:
            return tensor.shape[0] // batch

        blocks = []
        for index, block in enumerate(template.blocks):
            joined_block = {}
            for name, tensor in block.items():
                per = per_stream(tensor, template.batch_size)
                parts = [
                    state.blocks[index][name]
                    if state.allocated
                    else tensor.new_zeros(per * state.batch_size, *tensor.shape[1:])
                    for state in states
                ]
                joined_block[name] = torch.cat(parts)
            blocks.append(joined_block)
        joined.blocks = blocks
        joined.input_size = template.input_size
        stacks = set.intersection(*(set(state.heads) for state in states))
        joined.heads = {
            stack: {
                name: torch.cat([state.heads[stack][name] for state in states])
                for name in template.heads[stack]
            }
            for stack in stacks
        }
        return joined
