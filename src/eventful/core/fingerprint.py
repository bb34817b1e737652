"""A model's fingerprint: what ties saved calibrations and snapshots to the weights they fit."""

from __future__ import annotations

import hashlib
import weakref

import torch
from torch import Tensor, nn


def model_fingerprint(module: nn.Module) -> str:
    """Hex SHA-256 (first 16 digits) of every parameter and buffer of `module`: names, shapes,
    dtypes and values. Equal weights give equal fingerprints on any device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()[:16]


def tensor_key(tensor: Tensor) -> tuple:
    """What tells whether a tensor still holds the values a cache was computed from, without
    reading them: its storage, shape, dtype, device and version counter (which in-place changes
    advance). Inference tensors (made under `torch.inference_mode`) have no version counter, so
    their key leaves it out: an in-place change to them is seen only through
    `forget_weight_caches` (which `load_state_dict` of a converted model calls)."""
    version = None if tensor.is_inference() else tensor._version
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, tensor.device, version)


class ModuleWatch:
    """Whether a module tree still holds what it held when the watch was made: the same
    submodules, parameters and buffers (each slot's object), with the same values as far as
    `tensor_key` tells (each tensor's storage and version counter; an inference tensor's
    in-place change is seen only through `forget_weight_caches`, as there). Reads no values
    and no module attributes, in as few Python operations as it can: a step checks every
    block's watch with its objects evicted from the caches by the step before."""

    def __init__(self, module: nn.Module) -> None:
        self._slots: list[tuple[dict, str, object]] = []
        tensors = []
        for submodule in module.modules():
            for table in (submodule._modules, submodule._parameters, submodule._buffers):
                for name, value in table.items():
                    self._slots.append((table, name, value))
                    if isinstance(value, Tensor):
                        tensors.append(value)
        self._tensors = tensors
        self._pointers = [t.data_ptr() for t in tensors]
        self._versioned = [t for t in tensors if not t.is_inference()]
        self._versions = [t._version for t in self._versioned]

    def unchanged(self) -> bool:
        for table, name, value in self._slots:
            if table.get(name) is not value:
                return False
        pointers = [t.data_ptr() for t in self._tensors]
        versions = [t._version for t in self._versioned]
        return pointers == self._pointers and versions == self._versions


def forget_weight_caches(module: nn.Module) -> None:
    """Drop everything computed from the weights of `module` and its submodules (interpolated
    position embeddings, kernel matrices, the remembered fingerprint): the next use recomputes
    it. Modules that keep such caches define `clear_weight_caches()`."""
    for submodule in module.modules():
        _REMEMBERED.pop(submodule, None)
        if hasattr(submodule, "clear_weight_caches"):
            submodule.clear_weight_caches()


_REMEMBERED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def cached_fingerprint(module: nn.Module) -> str:
    """`model_fingerprint(module)`, remembered while no parameter or buffer of `module` is
    replaced or changed in place (`tensor_key` of each is the key): a stream can stamp every
    snapshot without hashing its weights each time."""
    key = tuple((name, *tensor_key(t)) for name, t in module.state_dict(keep_vars=True).items())
    remembered = _REMEMBERED.get(module)
    if remembered is None or remembered[0] != key:
        remembered = (key, model_fingerprint(module))
        _REMEMBERED[module] = remembered
    return remembered[1]
