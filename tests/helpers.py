"""Shared builders for the tests."""

import torch

import eventful

LEVELS = ("tokenwise", "qk", "full", "exact")

# Every block variant the canonical ViT has: plain, LayerScale, registers, no qkv bias.
VARIANTS = {
    "plain": {},
    "layer_scale": {"layer_scale_init": 0.3},
    "registers": {"num_registers": 2},
    "no_qkv_bias": {"qkv_bias": False},
}


def tiny_vit(seed: int = 0, **options) -> eventful.ViT:
    """A small ViT (64x64 input, 8x8 patches: 1 + 64 tokens) with random weights."""
    torch.manual_seed(seed)
    config = {"image_size": 64, "patch_size": 8, "dim": 48, "depth": 3, "heads": 4}
    config.update(options)
    return eventful.ViT(**config).eval()


def max_difference_to_dense(vit, policy, level, video) -> float:
    """Largest absolute difference of an eventful stream's outputs from the dense model's, over
    a video (T, B, 3, H, W)."""
    stream = eventful.convert(vit, policy=policy, level=level).stream(batch_size=video.shape[1])
    worst = 0.0
    with torch.no_grad():
        for frame in video:
            worst = max(worst, (stream(frame) - vit(frame)).abs().max().item())
    return worst
