"""torchvision classification models with their classifier heads removed.

`TorchvisionExtractor(weights, device, arch="convnext_tiny")` wraps any model of
`torchvision.models.list_models(module=torchvision.models)`; its feature is the pooled
pre-classifier embedding (the head, i.e. the last layer with one output per class, is replaced
by Identity) and its target preprocessing is the weights' own `transforms()`. The paper's
ResNet-50 and ViT-H/14 are subclasses with fixed weights and preprocessing.

`weights`: None (the default weights: torchvision's download cache, see
`ldm.extractors.weights`), a tag of the model's weights enum (`"IMAGENET1K_V2"`), "random"
(random init, nothing read), or a local file in torchvision's state_dict layout (with or without
the head's keys; `.safetensors`, `.pth`, `.pt`, `.bin`, `.ckpt`), loaded by the safe loader with
strict key checking.
"""
from __future__ import annotations

import difflib
import os
from typing import ClassVar
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet50_Weights, ViT_H_14_Weights, resnet50, vit_h_14

from ldm.extractors.base import FeatureExtractor
from ldm.extractors.errors import ExtractorSpecError
from ldm.extractors.preprocessing import Preprocessing, Readout
from ldm.extractors.weights import build_model, torchvision_source, weights_kind


def weights_preprocessing(member) -> Preprocessing:
    """The target transform of a torchvision weights member (`member.transforms()`), applied to
    generated images too."""
    t = member.transforms()
    return Preprocessing(input_size=t.crop_size[0], resize_size=t.resize_size[0],
                         interpolation=t.interpolation, mean=tuple(t.mean), std=tuple(t.std),
                         generated="target")


def torchvision_file_tag(arch: str, path) -> str | None:
    """The tag of `arch`'s weights whose file has `path`'s name (torchvision's own download
    names, e.g. mobilenet_v2-b0353104.pth is IMAGENET1K_V1), or None."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):
        return None
    name = os.path.basename(str(path))
    return next((m.name for m in enum if os.path.basename(urlparse(m.url).path) == name), None)


def torchvision_models() -> list[str]:
    """The classification models (not detection, segmentation, video or quantized ones)."""
    return torchvision.models.list_models(module=torchvision.models)


def weights_member(arch: str, tag: str | None):
    """The WeightsEnum member `tag` of `arch` (None: the enum's DEFAULT)."""
    enum = torchvision.models.get_model_weights(arch)
    if tag is None:
        return enum.DEFAULT
    try:
        return enum[tag] if tag != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ExtractorSpecError(
            f"torchvision:{arch} has no weights {tag!r}; its weights: "
            f"{', '.join(m.name for m in enum)} (or \"random\", or a local file)") from None


def architecture_kwargs(arch: str, member) -> dict:
    """What torchvision's builder sets itself when given `member` (we build with weights=None
    and load the state dict ourselves, through the safe loader)."""
    kwargs = {"num_classes": len(member.meta["categories"])}
    if arch.startswith("vit_"):
        kwargs["image_size"] = member.meta["min_size"][0]
    elif arch == "maxvit_t":
        kwargs["input_size"] = member.meta["min_size"]
    elif arch in ("googlenet", "inception_v3"):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    return kwargs


def find_head(model: nn.Module, num_classes: int) -> str:
    """The classifier: the last Linear (or Conv2d, as in SqueezeNet) with one output per class,
    in registration order (the heads of torchvision's classifiers are registered last)."""
    heads = [name for name, m in model.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == num_classes)
             or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]
    if not heads:
        raise ExtractorSpecError(f"cannot find the classifier of {type(model).__name__} "
                                 f"(no layer with {num_classes} outputs)")
    return heads[-1]


class TorchvisionExtractor(FeatureExtractor):
    """Any torchvision classifier; its head is replaced by Identity."""

    arch: ClassVar[str] = ""
    default_weights: ClassVar = None   # the paper classes' WeightsEnum member
    head: ClassVar[str] = ""           # the paper classes' head; found automatically otherwise
    title: ClassVar[str] = ""

    def __init__(self, weights: str | None = None, device="cpu", *, arch: str | None = None,
                 layer: str | None = None, spatial: bool = False, tag: str | None = None):
        super().__init__()
        self.arch = arch or self.arch
        paper = self.default_weights is not None
        tag = str(weights) if weights_kind(weights) == "tag" else tag
        if paper and tag not in (None, self.default_weights.name):
            raise ExtractorSpecError(
                f"{type(self).__name__} uses the paper's weights {self.default_weights.name}; "
                f"for {tag!r} use build_extractor('torchvision:{self.arch}', weights={tag!r})")
        member = self.default_weights if paper else weights_member(self.arch, tag)
        self.weights_tag = member.name
        self.title = self.title or f"torchvision {self.arch}"
        if not paper:
            self.name = f"torchvision:{self.arch}"
        kwargs = architecture_kwargs(self.arch, member)

        def check(model: nn.Module):
            self.model = model  # layer names are checked on the architecture, before loading
            self.set_layer(layer, spatial)

        self.model = build_model(
            lambda: self.architecture() if paper else torchvision.models.get_model(
                self.arch, weights=None, **kwargs),
            weights, lambda: torchvision_source(member, self.title), device=device, check=check,
            heads=lambda model: [self.head or find_head(model, kwargs["num_classes"])],
            expected=f"{self.title} ({type(member).__name__}.{member.name} layout)")
        self.freeze()
        if not paper:
            self.preprocessing = weights_preprocessing(member)
        if isinstance(self.model, torchvision.models.VisionTransformer):
            self.readout = Readout(prefix_tokens=1, class_token=True)
        elif isinstance(self.model, torchvision.models.SwinTransformer):
            # Swin's stages run channels-last; a hook after its final permute would see [B, C, H, W]
            self.readout = Readout(channels_last=True)
        self.to(device)

    @classmethod
    def architecture(cls) -> nn.Module:
        """The paper classes' full torchvision model (with its head), `weights=None`."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def unknown_torchvision_model(arch: str) -> ExtractorSpecError:
    names = torchvision_models()
    close = difflib.get_close_matches(arch, names, n=6, cutoff=0.5)
    return ExtractorSpecError(
        f"torchvision has no classification model {arch!r}"
        + (f"; close matches: {', '.join(close)}" if close else "")
        + f" (all {len(names)}: torchvision.models.list_models(module=torchvision.models))")


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
    arch = "resnet50"
    preprocessing = Preprocessing(input_size=224)
    default_weights = ResNet50_Weights.IMAGENET1K_V1
    head = "fc"
    title = "torchvision resnet50"

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
    arch = "vit_h_14"
    preprocessing = Preprocessing(input_size=518)
    readout = Readout(prefix_tokens=1, class_token=True)
    default_weights = ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1
    head = "heads.head"
    title = "torchvision vit_h_14"

    @classmethod
    def architecture(cls) -> nn.Module:
        return vit_h_14(weights=None, image_size=cls.preprocessing.input_size)
