"""Fine-tuning a ViT for token recycling (TORE) without labels, by distillation from itself.

Each step draws a batch of frames, a split K uniform over 0..depth, and a piece layout: the
grid cut into r x c rectangles (r and c uniform over 1..`max_side`, so 1 to 16 pieces by
default), in a random order, of which the first m (uniform over 1..r c) have arrived. The
student is the model being tuned, recycled at K (`Recycler.forward`); the teacher is a frozen
copy of the model before tuning, run whole on the union of the same pieces (split 0), which is
the dense model on the full frame when every piece has arrived. The loss is 1 - cosine of
the final tokens, the mean over the prefix tokens plus the mean over the patches. Every
parameter of the encoder is tuned, in eval mode (no dropout), with Adam.

A checkpoint is a safetensors file of the tuned encoder's weights and Adam moments, and a
JSON file beside it with the fingerprint of the model it was tuned from, the settings, the
progress and the log (`eventful.methods.checkpoints`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful.convert import find_encoder, is_encoder
from eventful.core.fingerprint import model_fingerprint
from eventful.methods.checkpoints import (
    adam_tensors,
    read_checkpoint_files,
    restore_adam,
    write_checkpoint,
)
from eventful.methods.tore import Recycler

FORMAT = "eventful-tore/1"

Piece = tuple[int, int, int, int]  # top, left, rows, cols, in patches

# Which of the encoder's parameters are tuned: every one, or only the vectors (biases, norms,
# layer scales, the class token: parameters with at most one dimension above 1).
TUNED = ("all", "vectors")


def tuned_parameters(encoder: nn.Module, tuned: str) -> list[nn.Parameter]:
    parameters = list(encoder.parameters())
    if tuned == "vectors":
        parameters = [p for p in parameters if p.numel() == max(p.shape, default=1)]
    return parameters


@dataclass(frozen=True)
class TrainSettings:
    """steps: optimizer steps; batch_size: frames per step; learning_rate: Adam's, reached
    linearly over the first warmup_steps, then decayed to 0 along a half cosine; max_side:
    layouts cut the grid into up to max_side x max_side pieces; tuned: which parameters
    (`TUNED`)."""

    steps: int = 600
    batch_size: int = 8
    learning_rate: float = 3e-6
    warmup_steps: int = 50
    max_side: int = 4
    tuned: str = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup_steps", "max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.tuned not in TUNED:
            raise ValueError(f"tuned must be one of {', '.join(TUNED)}, got {self.tuned!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")


def random_layout(grid: tuple[int, int], max_side: int, generator: torch.Generator) -> list[Piece]:
    """The grid cut into r x c near-equal rectangles (r, c uniform over 1..max_side, at most
    the grid's side), in a random order."""
    cuts = []
    for side in grid:
        count = int(torch.randint(1, min(max_side, side) + 1, (), generator=generator))
        cuts.append([round(index * side / count) for index in range(count + 1)])
    row_cuts, col_cuts = cuts
    pieces = [
        (top, left, bottom - top, right - left)
        for top, bottom in pairwise(row_cuts)
        for left, right in pairwise(col_cuts)
    ]
    order = torch.randperm(len(pieces), generator=generator).tolist()
    return [pieces[index] for index in order]


def learning_rate(settings: TrainSettings, step: int) -> float:
    """The learning rate of optimizer step `step` (from 0): linear warmup, half-cosine decay."""
    warmup = min(1.0, (step + 1) / settings.warmup_steps)
    decay = 0.5 * (1 + math.cos(math.pi * step / settings.steps))
    return settings.learning_rate * warmup * decay


def distillation_loss(student: Tensor, teacher: Tensor, prefix: int) -> tuple[Tensor, Tensor]:
    """(loss, mean cosine): 1 - cosine of final tokens (B, T, D), the mean over the prefix
    tokens plus the mean over the patches; without prefix tokens, the patches' alone."""
    cosine = F.cosine_similarity(student, teacher, dim=-1)
    loss = 1 - cosine[:, prefix:].mean()
    if prefix:
        loss = loss + 1 - cosine[:, :prefix].mean()
    return loss, cosine.mean()


@dataclass
class Progress:
    """Optimizer steps done, and one log entry per step."""

    step: int = 0
    log: list[dict] = field(default_factory=list)


class Trainer:
    """Fine-tunes the encoder of `model` (in place) for recycling on `frames` (F, C, H, W)."""

    def __init__(self, model: nn.Module, frames: Tensor, settings: TrainSettings) -> None:
        if frames.shape[0] < settings.batch_size:
            raise ValueError(
                f"training needs at least batch_size = {settings.batch_size} frames, "
                f"got {frames.shape[0]}"
            )
        self.encoder = model if is_encoder(model) else find_encoder(model)[1]
        self.students = [Recycler(self.encoder, 0)]
        own = {id(parameter) for parameter in self.encoder.parameters()}
        if any(id(parameter) not in own for parameter in self.students[0].parameters()):
            raise TypeError(
                f"fine-tuning for recycling tunes the encoder's own modules, but "
                f"{type(self.encoder).__name__} runs through a converted copy (q, k and v "
                "fused); tune eventful.models.hf.vit_from_hf(encoder), which has its weights"
            )
        self.fingerprint = model_fingerprint(self.encoder)
        self.encoder.eval()
        teacher = copy.deepcopy(self.encoder).requires_grad_(False)
        self.teacher = Recycler(teacher, 0)
        self.students += [
            Recycler(self.encoder, split) for split in range(1, len(self.teacher.blocks) + 1)
        ]
        patch = self.teacher.patch_size
        self.grid = (frames.shape[-2] // patch, frames.shape[-1] // patch)
        self.frames = frames
        self.settings = settings
        self.progress = Progress()
        self.optimizer = torch.optim.Adam(self.encoder.parameters(), lr=settings.learning_rate)

    @property
    def depth(self) -> int:
        return len(self.teacher.blocks)

    def step(self) -> dict:
        """One optimizer step; returns its log entry."""
        settings, progress = self.settings, self.progress
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + progress.step)
        batch = torch.randperm(self.frames.shape[0], generator=generator)[: settings.batch_size]
        frames = self.frames[batch]
        flip = torch.rand(len(batch), generator=generator) < 0.5
        frames = torch.where(flip[:, None, None, None], frames.flip(-1), frames)
        split = int(torch.randint(0, self.depth + 1, (), generator=generator))
        layout = random_layout(self.grid, settings.max_side, generator)
        arrived = int(torch.randint(1, len(layout) + 1, (), generator=generator))
        pieces = layout[:arrived]
        with torch.no_grad():
            target = self.teacher(frames, pieces).tokens
        prediction = self.students[split](frames, pieces).tokens
        prefix = self.teacher.embedding.num_prefix_tokens
        loss, cosine = distillation_loss(prediction, target, prefix)
        self.optimizer.zero_grad()
        loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(settings, progress.step)
        self.optimizer.step()
        entry = {
            "step": progress.step,
            "split": split,
            "pieces": len(layout),
            "arrived": arrived,
            "loss": round(float(loss.detach()), 5),
            "fidelity": round(float(cosine.detach()), 5),
            "seconds": round(time.perf_counter() - start, 3),
        }
        progress.log.append(entry)
        progress.step += 1
        return entry

    def run(
        self,
        on_step: Callable[[dict], None] | None = None,
        checkpoint: Path | None = None,
        every: int = 10,
    ) -> None:
        """Train to the end, saving `checkpoint` every `every` steps and at the end."""
        while self.progress.step < self.settings.steps:
            entry = self.step()
            if on_step is not None:
                on_step(entry)
            step = self.progress.step
            if checkpoint is not None and (step % every == 0 or step == self.settings.steps):
                self.save(checkpoint)

    def save(self, path: Path) -> None:
        """The tuned encoder's weights and Adam moments, and `path`.json."""
        tensors = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        moments, adam_steps = adam_tensors(self.optimizer, self.encoder)
        meta = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "settings": asdict(self.settings),
            "progress": {"step": self.progress.step},
            "adam_steps": adam_steps,
            "log": self.progress.log,
        }
        write_checkpoint(path, {**tensors, **moments}, meta)

    def resume(self, checkpoint: Checkpoint) -> None:
        """Continue the training saved in `checkpoint` (`read_checkpoint`): its weights, Adam
        moments and progress; its settings must be this trainer's."""
        if checkpoint.settings != self.settings:
            raise ValueError(
                f"the checkpoint was trained with {checkpoint.settings}; this trainer has "
                f"{self.settings}"
            )
        checkpoint.load_weights(self.encoder, self.fingerprint)
        restore_adam(self.optimizer, self.encoder, checkpoint.tensors, checkpoint.adam_steps)
        self.progress = Progress(checkpoint.progress.step, list(checkpoint.progress.log))


@dataclass
class Checkpoint:
    """A read checkpoint: the fingerprint of the model it was tuned from, its settings,
    progress, and tensors (weights and Adam moments)."""

    path: Path
    fingerprint: str
    settings: TrainSettings
    progress: Progress
    tensors: dict[str, Tensor]
    adam_steps: dict[str, float]

    def load_weights(self, encoder: nn.Module, fingerprint: str | None = None) -> None:
        """Put the tuned weights into `encoder`, whose weights before (fingerprint: given, or
        computed) must be those the checkpoint was tuned from; refuses, before touching it, a
        checkpoint for another model."""
        fingerprint = fingerprint or model_fingerprint(encoder)
        if fingerprint != self.fingerprint:
            raise ValueError(
                f"TORE checkpoint {self.path} was tuned from the model with fingerprint "
                f"{self.fingerprint}; this model's is {fingerprint}"
            )
        prefix = "encoder."
        weights = {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        expected = {name: tuple(value.shape) for name, value in encoder.state_dict().items()}
        found = {name: tuple(value.shape) for name, value in weights.items()}
        if found != expected:
            raise ValueError(f"TORE checkpoint {self.path} does not hold this model's weights")
        encoder.load_state_dict(weights)


def read_checkpoint(path: Path) -> Checkpoint:
    """Read checkpoint `path`; refuses a missing or unreadable file or another format."""
    meta, tensors = read_checkpoint_files(path, FORMAT, "TORE")
    return Checkpoint(
        Path(path),
        meta["fingerprint"],
        TrainSettings(**meta["settings"]),
        Progress(meta["progress"]["step"], meta["log"]),
        tensors,
        meta["adam_steps"],
    )


def load_tuned(model: nn.Module, path: Path) -> nn.Module:
    """Put the weights of TORE checkpoint `path` into `model` (a supported encoder, or a model
    that calls one), which must be the model it was tuned from; returns `model`."""
    encoder = model if is_encoder(model) else find_encoder(model)[1]
    read_checkpoint(path).load_weights(encoder)
    return model
