"""The feature-extractor interface: what the decoder needs to know about a target model.

An extractor maps images to features: one vector [B, D] per image by default, or, with a layer
and `spatial=True`, one map [B, C, H, W]. It knows nothing about diffusion or guidance.
Subclasses set their `Preprocessing` record and implement `embed` (the model's default feature);
the base class adds the rest: reading an intermediate layer (`layer`, see `ldm.extractors.layers`),
the target transform and the differentiable "virtual save" of generated images.
"""
from __future__ import annotations

import functools

import torch
from PIL import Image
from torch import nn

from ldm.extractors.errors import ExtractorSpecError, TextTargetNotSupported
from ldm.extractors.layers import find_layer, read_layer
from ldm.extractors.preprocessing import Preprocessing, Readout

# Attributes that used to be set one by one; they live in `preprocessing` and `readout` now.
_RECORD_FIELDS = ("input_size", "resize_size", "interpolation", "resize_mode", "mean", "std",
                  "antialias", "prefix_tokens", "class_token", "channels_last", "token_grid")


class _class_or_instance_method:
    """Like classmethod, but bound to the instance when called on one."""

    def __init__(self, fn):
        self.fn = fn

    def __get__(self, obj, owner):
        return functools.partial(self.fn, owner if obj is None else obj)


class FeatureExtractor(nn.Module):
    """Base class. Subclasses set `name` and `preprocessing` (a `Preprocessing`: input size,
    resize, interpolation, mean, std) and implement `embed` (or, for a model without layer
    support, override `encode` itself).

    - `readout` (a `Readout`): how layer outputs are read (tokens, channels-last maps).
    - `layer`, `spatial`: read the output of submodule `layer` (a path in `layer_root()`)
      instead of `embed`; pooled to [B, C] unless `spatial` (see `ldm.extractors.layers`).
    """

    name: str = "extractor"
    preprocessing: Preprocessing = Preprocessing()
    readout: Readout = Readout()
    layer: str | None = None
    spatial: bool = False
    weights_tag: str | None = None   # the library tag of the weights loaded, when known

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        stray = [name for name in _RECORD_FIELDS if name in vars(cls)]
        if stray:
            raise TypeError(f"{cls.__name__} sets {', '.join(stray)}: set them in its "
                            "`preprocessing = Preprocessing(...)` or `readout = Readout(...)`")

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    # --- features ------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, S, S] → the model's default feature [B, D] (e.g. the pooled
        pre-classifier embedding). Runs the forward pass through `layer_root()`."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, S, S] → features: `embed(x)` [B, D] or, with a layer, its
        output pooled [B, C] or, if `spatial`, as a map [B, C, H, W]."""
        if self.layer is None:
            return self.embed(x)
        return read_layer(self, x)

    def layer_root(self) -> nn.Module:
        """The module whose `named_modules()` names the layers (`@layer` of a spec)."""
        return self.model

    def set_layer(self, layer: str | None, spatial: bool = False) -> "FeatureExtractor":
        """Read submodule `layer` instead of the default feature; raises UnknownLayerError
        (listing valid names nearby) for a name the model does not have."""
        if layer is None:
            if spatial:
                raise ExtractorSpecError(
                    f"{self.name}: spatial=True needs a layer, whose map is kept: add "
                    "`@<layer>` to the spec, e.g. torchvision:resnet50@layer4")
        else:
            if type(self).embed is FeatureExtractor.embed:
                raise ExtractorSpecError(f"{self.name}: its class overrides `encode` rather than "
                                         "implementing `embed`, so its layers cannot be read: "
                                         "implement `embed` (the default feature) instead")
            find_layer(self.layer_root(), layer, self.name)
        self.layer, self.spatial = layer, spatial
        return self

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        raise TextTargetNotSupported(
            f"{self.name} only supports image targets: give --prompt a path to an image "
            "(text prompts need a text tower, e.g. scripts/clip_guided2.py)")

    @_class_or_instance_method
    def supports_text(self_or_cls) -> bool:
        """Whether text targets work: the class has a text tower (callable on the class) and,
        on an instance, the feature is the default embedding (a layer's feature is not in the
        text tower's space)."""
        cls = self_or_cls if isinstance(self_or_cls, type) else type(self_or_cls)
        return (cls.encode_text is not FeatureExtractor.encode_text
                and getattr(self_or_cls, "layer", None) is None)

    def freeze(self) -> "FeatureExtractor":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: batch-norm statistics and dropout stay in eval mode

    @property
    def device(self) -> torch.device:
        tensor = next(iter([*self.parameters(), *self.buffers()]), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @torch.no_grad()
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one image's feature (without the batch dimension), from one forward pass of
        a grey `input_size` image: (D,) or, spatial, (C, H, W)."""
        grey = torch.zeros(1, 3, self.input_size, self.input_size, device=self.device)
        return tuple(self(grey).shape[1:])

    # --- targets ------------------------------------------------------------------------------
    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """PIL target → normalised [1, 3, S, S] (see `Preprocessing.target`)."""
        return self.preprocessing.target(image)

    @torch.no_grad()
    def image_features(self, image: Image.Image) -> torch.Tensor:
        return self.encode(self.preprocess_image(image).to(self.device)).float()

    # --- generated images (differentiable) -----------------------------------------------------
    def virtual_save(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → normalised model input, imitating saving to 8-bit and reloading
        (see `Preprocessing.generated_images`)."""
        return self.preprocessing.generated_images(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Generated images in [-1, 1] → float32 features [B, D] (or [B, C, H, W])."""
        return self.encode(self.virtual_save(images)).float()
