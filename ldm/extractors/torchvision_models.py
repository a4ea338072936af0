"""ResNet-50 and ViT-H/14 from torchvision with their classifier heads removed.

Both take `weights=None` (torchvision's download cache, see `ldm.extractors.weights`) or a local
file in torchvision's state_dict layout (with or without the head's keys; `.safetensors`,
`.pth`, `.pt`, `.bin`, `.ckpt`), loaded by the safe loader with strict key checking.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, ViT_H_14_Weights, resnet50, vit_h_14

from ldm.checkpoint import load_into
from ldm.extractors.base import FeatureExtractor
from ldm.extractors.weights import load_weights_file, resolve, torchvision_source


class TorchvisionExtractor(FeatureExtractor):
    """A torchvision classifier whose head (`head`, a submodule path) is replaced by Identity."""

    default_weights: ClassVar = None   # a torchvision WeightsEnum member
    head: ClassVar[str] = ""
    title: ClassVar[str] = ""
    feature_dim: ClassVar[int] = 0

    def __init__(self, weights: str | None = None, device="cpu"):
        super().__init__()
        if weights is not None:
            state_dict = load_weights_file(weights)
        else:
            state_dict = resolve(torchvision_source(self.default_weights, self.title))
        self.model = self._build(state_dict, device)
        self.freeze()
        self.to(device)

    @classmethod
    def architecture(cls) -> nn.Module:
        """The full torchvision model (with its head), `weights=None`."""
        raise NotImplementedError

    def _build(self, state_dict: dict[str, torch.Tensor], device) -> nn.Module:
        with torch.device("meta"):  # skip the random init: every tensor is loaded below
            model = self.architecture()
        own = set(model.state_dict())
        if any(n not in own for n, _ in [*model.named_parameters(), *model.named_buffers()]):
            model = self.architecture()  # non-persistent buffers would stay uninitialised
        else:
            model.to_empty(device=device)
        head_keys = [k for k in own if k.startswith(self.head + ".")]
        if head_keys and not any(k in state_dict for k in head_keys):
            model.set_submodule(self.head, nn.Identity())  # a file without the head
        tag = f"{type(self.default_weights).__name__}.{self.default_weights.name}"
        load_into(model, state_dict, ignorable=(), expected=f"{self.title} ({tag} layout)")
        model.set_submodule(self.head, nn.Identity())
        return model

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ResNet50Extractor(TorchvisionExtractor):
    """torchvision ResNet-50, ImageNet weights `IMAGENET1K_V1` (the reference's
    `resnet50(pretrained=True)`): the 2048-d global-average-pooled, post-ReLU feature (`fc`
    removed).

    Preprocessing follows the reference, not the weights' own transforms: the target image is
    resized (shorter side) to 224 bicubic and centre-cropped to 224, whereas
    `ResNet50_Weights.IMAGENET1K_V1.transforms()` resizes to 256 bilinear before the 224 crop.
    Weights file: `resnet50-0676ba61.pth` in `$TORCH_HOME/hub/checkpoints/`.
    """

    name = "resnet50"
    input_size = 224
    default_weights = ResNet50_Weights.IMAGENET1K_V1
    head = "fc"
    title = "torchvision resnet50"
    feature_dim = 2048

    @classmethod
    def architecture(cls) -> nn.Module:
        return resnet50(weights=None)


class VitH14Extractor(TorchvisionExtractor):
    """torchvision ViT-H/14, weights `IMAGENET1K_SWAG_E2E_V1` (fine-tuned end to end at 518):
    the 1280-d class token after the final LayerNorm (`heads.head` removed). Input 518×518;
    the preprocessing (resize 518 bicubic, centre crop 518, ImageNet mean/std) equals the weights'
    own transforms. 632M parameters, about 2 TFLOP per image: use a GPU.
    Weights file: `vit_h_14_swag-80465313.pth` in `$TORCH_HOME/hub/checkpoints/`.
    """

    name = "vit_h_14"
    input_size = 518
    default_weights = ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1
    head = "heads.head"
    title = "torchvision vit_h_14"
    feature_dim = 1280

    @classmethod
    def architecture(cls) -> nn.Module:
        return vit_h_14(weights=None, image_size=cls.input_size)
