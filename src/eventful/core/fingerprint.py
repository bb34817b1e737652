"""A model's fingerprint: what ties saved calibrations and snapshots to the weights they fit."""

from __future__ import annotations

import hashlib
import weakref

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


_REMEMBERED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def cached_fingerprint(module: nn.Module) -> str:
    """`model_fingerprint(module)`, remembered while no parameter or buffer of `module` is
    replaced or changed in place (their storage, version counter, shape, dtype and device are
    the key): a stream can stamp every snapshot without hashing its weights each time."""
    key = tuple(
        (name, t.data_ptr(), t._version, tuple(t.shape), t.dtype, str(t.device))
        for name, t in module.state_dict(keep_vars=True).items()
    )
    remembered = _REMEMBERED.get(module)
    if remembered is None or remembered[0] != key:
        remembered = (key, model_fingerprint(module))
        _REMEMBERED[module] = remembered
    return remembered[1]
