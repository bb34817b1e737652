"""Training checkpoints of the methods: a safetensors file of weights and Adam moments, and a
JSON file beside it (same name, suffix .json) with the format, the model's fingerprint, the
settings, the progress and the log."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


def meta_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def write_checkpoint(path: Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write `tensors` to `path` and `meta` to the JSON file beside it. Both files are written
    in full beside their targets before either replaces its target: a run stopped while
    saving never leaves a file cut short."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights_part = path.with_name(path.name + ".part")
    meta_part = path.with_name(path.name + ".json.part")
    save_file(
        {name: tensor.detach().contiguous() for name, tensor in tensors.items()}, str(weights_part)
    )
    meta_part.write_text(json.dumps(meta, indent=1))
    os.replace(weights_part, path)
    os.replace(meta_part, meta_path(path))


def read_checkpoint_files(path: Path, format: str, what: str) -> tuple[dict, dict[str, Tensor]]:
    """The JSON metadata and the tensors of checkpoint `path`; refuses a missing or unreadable
    file and a checkpoint of another format. `what` names the checkpoint in errors."""
    path = Path(path)
    meta_file = meta_path(path)
    for needed in (path, meta_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{what} checkpoint: {needed} does not exist")
    try:
        meta = json.loads(meta_file.read_text())
        tensors = load_file(str(path))
    except (ValueError, OSError, SafetensorError) as error:
        raise ValueError(f"{what} checkpoint {path} cannot be read: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != format:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(
            f"{meta_file} is not a {what} checkpoint of format {format!r} (format {found!r})"
        )
    return meta, tensors


def adam_tensors(
    optimizer: torch.optim.Adam, module: nn.Module
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The Adam moments of `optimizer` for `module`'s parameters, as tensors named
    adam.NAME.exp_avg and adam.NAME.exp_avg_sq, and the step count of each NAME."""
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    tensors, steps = {}, {}
    for parameter, state in optimizer.state.items():
        if not state:
            continue
        name = names[id(parameter)]
        tensors[f"adam.{name}.exp_avg"] = state["exp_avg"]
        tensors[f"adam.{name}.exp_avg_sq"] = state["exp_avg_sq"]
        steps[name] = float(state["step"])
    return tensors, steps


def restore_adam(
    optimizer: torch.optim.Adam,
    module: nn.Module,
    tensors: dict[str, Tensor],
    steps: dict[str, float],
) -> None:
    """Put saved Adam moments (`adam_tensors`) back for the parameters `optimizer` trains."""
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            name = names[id(parameter)]
            if name not in steps:
                continue
            optimizer.state[parameter] = {
                "step": torch.tensor(steps[name]),
                "exp_avg": tensors[f"adam.{name}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].clone(),
            }
