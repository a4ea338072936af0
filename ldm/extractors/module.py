"""`ModuleExtractor`: any torch.nn.Module as a target model, from the Python API.

    extractor = ModuleExtractor(my_net, input_size=128, layer="blocks.2", spatial=True)
    extractor = ModuleExtractor(my_net, preprocess=my_differentiable_transform)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ldm.extractors.base import FeatureExtractor
from ldm.extractors.preprocessing import (IMAGENET_MEAN, IMAGENET_STD, Preprocessing, Readout,
                                          round_straight_through, to_rgb)

Preprocess = Callable[[torch.Tensor], torch.Tensor]


class ModuleExtractor(FeatureExtractor):
    """Wraps `module`; its feature is `module(x)` or, with `layer`, that submodule's output
    (pooled to [B, C], or kept as a map with `spatial=True`; see `ldm.extractors.layers`).

    The module is frozen in place: `requires_grad_(False)` and eval mode, for good (the
    decoder differentiates with respect to the image, never the model).

    Without `preprocess`, images are resized to `input_size` and normalised with `mean`/`std`,
    as for the library models (target: shorter side to `resize_size` or `input_size` with
    `interpolation`, centre crop). `preprocess`, if given, replaces resize and normalisation for
    both the target and the generated images: a differentiable callable taking float images in
    [0, 1] of shape [B, 3, H, W] (any H, W) to the module's input. Generated images still go
    through the 8-bit straight-through rounding of `virtual_save` before it.

    Token outputs [B, N, C]: pass `readout=Readout(prefix_tokens=1, class_token=True)` if the
    module has a class token; by default all tokens are patch tokens, pooled by their mean.
    """

    def __init__(self, module: nn.Module, *, preprocess: Preprocess | None = None,
                 input_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, resize_size: int | None = None,
                 interpolation: InterpolationMode = InterpolationMode.BICUBIC,
                 layer: str | None = None, spatial: bool = False, name: str = "module",
                 readout: Readout = Readout()):
        super().__init__()
        self.model = module
        self.preprocess = preprocess
        self.name, self.readout = name, readout
        self.preprocessing = Preprocessing(int(input_size), resize_size, interpolation, mean=tuple(mean),
                                           std=tuple(std), generated="target")
        self.set_layer(layer, spatial)
        self.freeze()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        if self.preprocess is None:
            return super().preprocess_image(image)
        return self.preprocess(TF.to_tensor(to_rgb(image)).unsqueeze(0).to(self.device))

    def virtual_save(self, images: torch.Tensor) -> torch.Tensor:
        if self.preprocess is None:
            return super().virtual_save(images)
        return self.preprocess(round_straight_through((images + 1) / 2 * 255) / 255)
