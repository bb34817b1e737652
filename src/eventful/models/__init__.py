"""Model definitions, the adapters that describe them to the engine, real pretrained weights,
and the registry of models by name (`create`)."""

from eventful.models.imgfocus import imgfocus_saliency
from eventful.models.registry import MODEL_NAMES, create
from eventful.models.saliency import SaliencyModel, SaliencyOutput
from eventful.models.vit import ViT
from eventful.models.vitdet import ViTDet, vitdet_from_vit

__all__ = [
    "MODEL_NAMES",
    "SaliencyModel",
    "SaliencyOutput",
    "ViT",
    "ViTDet",
    "create",
    "imgfocus_saliency",
    "vitdet_from_vit",
]
