"""Feature extractors: the vision models whose features are decoded back into images.

    extractor = build_extractor("torchvision:resnet50")          # the paper's; download cache
    extractor = build_extractor("open_clip:RN50", weights="open_clip_model.safetensors", device="cuda")
    extractor = build_extractor("timm:convnext_tiny@stages.2", weights="random", spatial=True)
    extractor = ModuleExtractor(my_module, input_size=128, layer="blocks.3")

Specs are `library:model[@layer]` (see `ldm.extractors.registry`); the old short names
(resnet50, clip_rn50, vit_h_14, toy_*) stay valid.
"""
from ldm.extractors.base import FeatureExtractor
from ldm.extractors.errors import ExtractorSpecError, TextTargetNotSupported, UnknownLayerError
from ldm.extractors.clip import ClipRN50Extractor, OpenClipExtractor
from ldm.extractors.module import ModuleExtractor
from ldm.extractors.registry import (LIBRARIES, ExtractorSpec, build_extractor, check_spec,
                                     list_extractors, list_layers, parse_spec, register_extractor)
from ldm.extractors.torchvision_models import (ResNet50Extractor, TorchvisionExtractor,
                                               VitH14Extractor)
from ldm.extractors.weights import WeightsNotFoundError

__all__ = ["LIBRARIES", "ClipRN50Extractor", "ExtractorSpec", "ExtractorSpecError",
           "FeatureExtractor", "ModuleExtractor", "OpenClipExtractor", "ResNet50Extractor",
           "TextTargetNotSupported", "TorchvisionExtractor", "UnknownLayerError",
           "VitH14Extractor", "WeightsNotFoundError", "build_extractor", "list_extractors",
           "check_spec", "list_layers", "parse_spec", "register_extractor"]
