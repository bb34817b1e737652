"""A model's fingerprint: what ties saved calibrations and snapshots to the weights they fit."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_fingerprint(module: nn.Module) -> str:
    """Hex SHA-256 (first 16 digits) of every parameter and buffer of `module`: names, shapes,
    dtypes and values. Equal weights give equal fingerprints on any device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()[:16]
