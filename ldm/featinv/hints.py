"""An extractor's feature as the hint of a FeatInv decoder."""
from __future__ import annotations

import torch

from ldm.extractors.base import FeatureExtractor


def feature_to_hint(feature: torch.Tensor) -> torch.Tensor:
    """Features → the ControlNet's hint [B, C, h, w].

    Spatial maps [B, C, H, W] (the registry's spatial readout of a layer; ViT tokens already
    come as a grid without the class token) stay as they are. Pooled vectors [B, D] become
    [B, D, 1, 1], which the hint block's bilinear upsampling copies to every position:
    FeatInv's pooled baseline."""
    if feature.dim() == 4:
        return feature
    if feature.dim() == 2:
        return feature[:, :, None, None]
    raise ValueError(f"a feature of shape {tuple(feature.shape)} is neither a vector [B, D] "
                     "nor a map [B, C, H, W]")


def hint_shape(extractor: FeatureExtractor) -> tuple[int, int, int]:
    """Shape (C, h, w) of one image's hint under `extractor` (its spatial or pooled feature)."""
    return tuple(feature_to_hint(torch.zeros(1, *extractor.feature_shape())).shape[1:])
