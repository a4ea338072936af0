"""Feature extractors: the vision models whose features are decoded back into images.

    extractor = build_extractor("resnet50")                  # torchvision download cache
    extractor = build_extractor("clip_rn50", weights="open_clip_model.safetensors", device="cuda")
"""
from ldm.extractors.base import FeatureExtractor, TextTargetNotSupported
from ldm.extractors.clip import ClipRN50Extractor
from ldm.extractors.torchvision_models import ResNet50Extractor, VitH14Extractor
from ldm.extractors.toy import TOY_EXTRACTORS
from ldm.extractors.weights import WeightsNotFoundError

EXTRACTORS: dict[str, type[FeatureExtractor]] = {
    "clip_rn50": ClipRN50Extractor,
    "resnet50": ResNet50Extractor,
    "vit_h_14": VitH14Extractor,
    **TOY_EXTRACTORS,
}


def build_extractor(name: str, **kwargs) -> FeatureExtractor:
    """`EXTRACTORS[name](**kwargs)` (kwargs: `weights=None`, `device="cpu"`)."""
    try:
        cls = EXTRACTORS[name]
    except KeyError:
        raise ValueError(f"unknown extractor {name!r}; valid names: "
                         + ", ".join(sorted(EXTRACTORS))) from None
    return cls(**kwargs)


__all__ = ["EXTRACTORS", "ClipRN50Extractor", "FeatureExtractor",
           "ResNet50Extractor", "TextTargetNotSupported", "VitH14Extractor",
           "WeightsNotFoundError", "build_extractor"]
