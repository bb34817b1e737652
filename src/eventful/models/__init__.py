"""The canonical ViT and the adapters that fill it."""

from eventful.models.vit import ViT

__all__ = ["ViT"]
