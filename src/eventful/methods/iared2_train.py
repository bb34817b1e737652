"""Training IA-RED^2's interpreters without labels: REINFORCE against the frozen dense model.

Each step draws a batch of frames and runs the model with the group being trained sampling
its keep decisions (one Bernoulli draw per token, from the interpreter's probabilities); the
groups trained before it keep what their interpreters rate at least 0.5, the groups after it
keep everything. The reward of a frame is its agreement with the dense model (`fidelity`),
penalised below a bar, minus a penalty that grows with the share of the blocks' tokens kept
(`keep_share`); the gradient is REINFORCE's, with the mean reward of the rest of the batch as
the baseline. Groups are trained one after another, shallow to deep (a curriculum); the
backbone stays frozen.

A checkpoint is a safetensors file of the interpreters' weights and Adam moments, and a JSON
file beside it with the backbone's fingerprint, the settings, the progress and the log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from eventful.methods.checkpoints import (
    adam_tensors,
    meta_path,
    read_checkpoint_files,
    write_checkpoint,
)
from eventful.methods.checkpoints import restore_adam as restore
from eventful.methods.iared2 import IARed2, IARed2Model, KeepRule

FORMAT = "eventful-iared2/1"


@dataclass(frozen=True)
class TrainSettings:
    """steps_per_group: optimizer steps for each group's interpreter; batch_size: frames per
    step; bar: the fidelity (mean cosine) below which a frame is penalised; below_bar_weight:
    the penalty for falling the whole way from the bar to 1 - 2 (1 - bar); keep_weight: the
    penalty for keeping every token (it grows with the square of the share kept)."""

    steps_per_group: int = 60
    batch_size: int = 8
    learning_rate: float = 0.001
    bar: float = 0.95
    below_bar_weight: float = 2.0
    keep_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps_per_group", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be at least 2 (the baseline is the rest of the batch), "
                f"got {self.batch_size}"
            )
        if not 0.0 < self.bar < 1.0:
            raise ValueError(f"bar must lie in (0, 1), got {self.bar!r}")


def fidelity(tokens: Tensor, dense: Tensor, kept: Tensor, prefix: int) -> Tensor:
    """Per frame (B,), the mean cosine against the dense model's final tokens (B, T, D) of the
    tokens that reach the end: the prefix tokens and the patches kept by the last group."""
    cosine = F.cosine_similarity(tokens, dense, dim=-1)
    reached = torch.cat([kept.new_ones(kept.shape[0], prefix), kept], dim=1).to(cosine.dtype)
    return (cosine * reached).sum(dim=1) / reached.sum(dim=1)


def keep_share(model: IARed2, kept: list[Tensor]) -> Tensor:
    """Per frame (B,), the share of the blocks' patch tokens processed: each group's kept share
    weighted by its number of blocks (the ops the blocks run, up to attention's square)."""
    ends = (*model.starts[1:], len(model.blocks))
    sizes = [end - start for start, end in zip(model.starts, ends, strict=True)]
    shares = [blocks * group.float().mean(dim=1) for blocks, group in zip(sizes, kept, strict=True)]
    return torch.stack(shares).sum(dim=0) / len(model.blocks)


def reward(fidelities: Tensor, shares: Tensor, settings: TrainSettings) -> Tensor:
    """Per frame: - keep_weight * share^2 - below_bar_weight * (shortfall below the bar, in
    units of 2 (1 - bar))."""
    shortfall = (settings.bar - fidelities).clamp(min=0) / (2 * (1 - settings.bar))
    return -settings.keep_weight * shares**2 - settings.below_bar_weight * shortfall


class CurriculumRule:
    """Keep decisions while group `training` learns: earlier groups keep at probability 0.5 or
    more, the training group samples (and records its log-probabilities, per frame, averaged
    over the tokens it scored), later groups keep everything."""

    def __init__(self, training: int, generator: torch.Generator) -> None:
        self.training = training
        self.generator = generator
        self.log_probability: Tensor | None = None

    def __call__(self, group: int, probabilities: Tensor, present: Tensor) -> Tensor:
        if group < self.training:
            return KeepRule()(probabilities, present)
        if group > self.training:
            return present
        draw = torch.rand(probabilities.shape, generator=self.generator)
        keep = present & (draw < probabilities.detach())
        chosen = torch.where(keep, probabilities, 1 - probabilities).clamp(min=1e-6)
        logs = torch.where(present, chosen.log(), 0.0)
        self.log_probability = logs.sum(dim=1) / present.sum(dim=1).clamp(min=1)
        return keep


@dataclass
class Progress:
    """Where training stands: the group being trained and its next step; one log entry per
    step (group, step, mean reward, keep share, fidelity, seconds it took)."""

    group: int = 0
    step: int = 0
    log: list[dict] = field(default_factory=list)


class Trainer:
    """Trains `model`'s interpreters on `frames` (F, C, H, W) against its own dense output."""

    def __init__(
        self,
        model: IARed2Model,
        frames: Tensor,
        settings: TrainSettings,
        progress: Progress | None = None,
    ) -> None:
        if frames.shape[0] < settings.batch_size:
            raise ValueError(
                f"training needs at least batch_size = {settings.batch_size} frames, "
                f"got {frames.shape[0]}"
            )
        self.model = model
        self.frames = frames
        self.settings = settings
        self.progress = progress or Progress()
        self.optimizer = self._optimizer(self.progress.group)
        self.dense = torch.cat(
            [model.dropping.dense(chunk) for chunk in frames.split(settings.batch_size)]
        )

    @property
    def total_steps(self) -> int:
        return len(self.model.interpreters) * self.settings.steps_per_group

    @property
    def done_steps(self) -> int:
        return self.progress.group * self.settings.steps_per_group + self.progress.step

    def _optimizer(self, group: int) -> torch.optim.Adam:
        parameters = self.model.interpreters[min(group, len(self.model.interpreters) - 1)]
        return torch.optim.Adam(parameters.parameters(), lr=self.settings.learning_rate)

    def step(self) -> dict:
        """One optimizer step of the current group; returns its log entry."""
        settings, progress = self.settings, self.progress
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(
            settings.seed * 1_000_003 + progress.group * 10_007 + progress.step
        )
        batch = torch.randperm(self.frames.shape[0], generator=generator)[: settings.batch_size]
        rule = CurriculumRule(progress.group, generator)
        dropping = self.model.dropping
        result = dropping(self.frames[batch], rule)
        prefix = dropping.embedding.num_prefix_tokens
        fidelities = fidelity(result.tokens, self.dense[batch], result.kept[-1], prefix)
        shares = keep_share(dropping, result.kept)
        rewards = reward(fidelities, shares, settings)
        others = (rewards.sum() - rewards) / (rewards.numel() - 1)
        loss = -((rewards - others).detach() * rule.log_probability).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        entry = {
            "group": progress.group,
            "step": progress.step,
            "reward": round(float(rewards.mean()), 5),
            "keep_share": round(float(shares.mean()), 5),
            "fidelity": round(float(fidelities.mean()), 5),
            "seconds": round(time.perf_counter() - start, 3),
        }
        progress.log.append(entry)
        progress.step += 1
        if progress.step == settings.steps_per_group:
            progress.group, progress.step = progress.group + 1, 0
            self.optimizer = self._optimizer(progress.group)
        return entry

    def run(
        self,
        on_step: Callable[[dict], None] | None = None,
        checkpoint: Path | None = None,
        every: int = 10,
    ) -> None:
        """Train to the end, saving `checkpoint` every `every` steps and at the end."""
        while self.done_steps < self.total_steps:
            entry = self.step()
            if on_step is not None:
                on_step(entry)
            if checkpoint is not None and (
                self.done_steps % every == 0 or self.done_steps == self.total_steps
            ):
                self.save(checkpoint)

    def save(self, path: Path) -> None:
        """The interpreters' weights and Adam moments (safetensors) and `path`.json."""
        save_checkpoint(path, self.model, self.settings, self.progress, self.optimizer)


def save_checkpoint(path, model, settings, progress, optimizer=None) -> None:
    """Write checkpoint `path` (safetensors: the interpreters, and the Adam moments of
    `optimizer`) and the JSON file beside it."""
    tensors = {f"interpreters.{k}": v for k, v in model.interpreters.state_dict().items()}
    adam_steps = {}
    if optimizer is not None:
        moments, adam_steps = adam_tensors(optimizer, model.interpreters)
        tensors.update(moments)
    meta = {
        "format": FORMAT,
        "fingerprint": model.fingerprint,
        "model": model.dropping.settings,
        "settings": asdict(settings),
        "progress": {"group": progress.group, "step": progress.step},
        "adam_steps": adam_steps,
        "log": progress.log,
    }
    write_checkpoint(path, tensors, meta)


@dataclass
class Checkpoint:
    """A read checkpoint: its settings, progress, and tensors (weights and Adam moments)."""

    settings: TrainSettings
    progress: Progress
    tensors: dict[str, Tensor]
    adam_steps: dict[str, float]


def read_checkpoint(path: Path, model: IARed2Model) -> Checkpoint:
    """Load the interpreters of checkpoint `path` into `model` and return it; refuses, before
    touching the model, a checkpoint of another format, backbone or interpreter layout."""
    meta, tensors = read_checkpoint_files(path, FORMAT, "IA-RED^2")
    if meta["fingerprint"] != model.fingerprint:
        raise ValueError(
            f"IA-RED^2 checkpoint {path} was trained for the backbone with fingerprint "
            f"{meta['fingerprint']}; this model's is {model.fingerprint}"
        )
    if meta["model"] != model.dropping.settings:
        raise ValueError(
            f"IA-RED^2 checkpoint {path} has interpreters {meta['model']}; this model has "
            f"{model.dropping.settings}"
        )
    prefix = "interpreters."
    weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    model.interpreters.load_state_dict(weights)
    progress = Progress(meta["progress"]["group"], meta["progress"]["step"], meta["log"])
    return Checkpoint(TrainSettings(**meta["settings"]), progress, tensors, meta["adam_steps"])


def checkpoint_groups(path: Path) -> list[int]:
    """The first block of each group of the interpreters saved at `path`."""
    meta_file = meta_path(path)
    if not meta_file.is_file():
        raise FileNotFoundError(f"IA-RED^2 checkpoint: {meta_file} does not exist")
    try:
        return list(json.loads(meta_file.read_text())["model"]["starts"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{meta_file} is not an IA-RED^2 checkpoint: {error}") from error


def restore_adam(optimizer: torch.optim.Adam, model: IARed2Model, checkpoint: Checkpoint) -> None:
    """Put the checkpoint's Adam moments back for the parameters `optimizer` trains."""
    restore(optimizer, model.interpreters, checkpoint.tensors, checkpoint.adam_steps)
