"""The canonical ViT, the adapters that fill it, and real pretrained weights."""

from eventful.models.imgfocus import imgfocus_saliency
from eventful.models.saliency import SaliencyModel, SaliencyOutput
from eventful.models.vit import ViT

__all__ = ["SaliencyModel", "SaliencyOutput", "ViT", "imgfocus_saliency"]
