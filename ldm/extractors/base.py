"""The feature-extractor interface: what the decoder needs to know about a target model.

An extractor maps images to features: one vector [B, D] per image by default, or, with a layer
and `spatial=True`, one map [B, C, H, W]. It knows nothing about diffusion or guidance.
Subclasses set the preprocessing constants and implement `embed` (the model's default feature);
the base class adds the rest: reading an intermediate layer (`layer`, see `ldm.extractors.layers`),
the target transform and the differentiable "virtual save" of generated images.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TextTargetNotSupported(ValueError):
    pass


class ExtractorSpecError(ValueError):
    """An extractor spec (`library:model[@layer]`), weights tag or option that cannot work; the
    message says what is valid. The CLI prints these as usage errors."""


class UnknownLayerError(ExtractorSpecError):
    """`@layer` names no submodule of the model; the message lists valid names nearby."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → 8-bit RGB, upright: EXIF orientation applied, then `.convert("RGB")` as
    the reference's loader did (grey, palette, RGBA, CMYK ...). 16-bit greyscale ("I;16*", and
    "I" with values above 255) is first scaled to 8 bits (v / 257), which `.convert` would
    instead clip to 255."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if image.mode != "I" or values.max(initial=0) > 255:
            values = values.clip(0, 65535) / 257
        image = Image.fromarray(np.round(values.clip(0, 255)).astype(np.uint8))  # mode L
    return image.convert("RGB")


def round_straight_through(x: torch.Tensor) -> torch.Tensor:
    """Forward value round(x), gradient of the identity."""
    return x + (torch.round(x) - x).detach()


class _class_or_instance_method:
    """Like classmethod, but bound to the instance when called on one."""

    def __init__(self, fn):
        self.fn = fn

    def __get__(self, obj, owner):
        return functools.partial(self.fn, owner if obj is None else obj)


class FeatureExtractor(nn.Module):
    """Base class. Subclasses set `name`, `input_size`, `mean`, `std` and implement `embed`
    (or, for a model without layer support, override `encode` itself).

    - `input_size`: side of the square image the model sees (224 for ResNet-50, 518 for ViT-H/14).
    - `resize_size`, `interpolation`, `resize_mode`: the target transform resizes the shorter
      side (`"shorter"`) or both sides (`"squash"`) to `resize_size` (None: `input_size`) with
      `interpolation`, then centre-crops `input_size`.
    - `antialias`: whether the bicubic resize of generated images is antialiased. The reference
      left it to the torchvision default (off up to 0.16, on from 0.17); we choose explicitly.
    - `log_cosine`: the log lines carry the cosine similarity (on for every extractor).
    - `layer`, `spatial`: read the output of submodule `layer` (a path in `layer_root()`)
      instead of `embed`; pooled to [B, C] unless `spatial` (see `ldm.extractors.layers`).
    - `prefix_tokens`, `class_token`, `channels_last`, `token_grid`: how to read the model's
      layer outputs: [B, N, C] token sequences start with `prefix_tokens` non-patch tokens
      (the first of which is a class token if `class_token`), 4-D maps are [B, H, W, C] if
      `channels_last`, and patch tokens form a `token_grid` (h, w) (None: a square).
    """

    name: str = "extractor"
    input_size: int = 224
    resize_size: int | None = None
    interpolation: InterpolationMode = InterpolationMode.BICUBIC
    resize_mode: str = "shorter"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    antialias: bool = True
    log_cosine: bool = True
    layer: str | None = None
    spatial: bool = False
    prefix_tokens: int = 0
    class_token: bool = False
    channels_last: bool = False
    token_grid: tuple[int, int] | None = None

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
        from ldm.extractors.layers import read_layer
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
            from ldm.extractors.layers import find_layer
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
        """PIL target → [1, 3, S, S]: RGB, resize to `resize_size` (see the class doc;
        the reference's: shorter side to S, bicubic), centre crop S, to tensor, normalise."""
        image = to_rgb(image)
        size = self.resize_size or self.input_size
        image = TF.resize(image, [size, size] if self.resize_mode == "squash" else size,
                          interpolation=self.interpolation)
        image = TF.center_crop(image, self.input_size)
        x = TF.normalize(TF.to_tensor(image), self.mean, self.std)
        return x.unsqueeze(0)

    @torch.no_grad()
    def image_features(self, image: Image.Image) -> torch.Tensor:
        return self.encode(self.preprocess_image(image).to(self.device)).float()

    # --- generated images (differentiable) -----------------------------------------------------
    def virtual_save(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → normalised model input, imitating saving to 8-bit and reloading:
        ×255, round, bicubic resize to S, round, /255, normalise. Rounding is straight-through,
        and, as in the reference, values are not clamped to [0, 255]."""
        x = round_straight_through((images + 1) / 2 * 255)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = TF.resize(x, [self.input_size, self.input_size],
                          interpolation=InterpolationMode.BICUBIC, antialias=self.antialias)
        x = round_straight_through(x) / 255
        return TF.normalize(x, self.mean, self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Generated images in [-1, 1] → float32 features [B, D] (or [B, C, H, W])."""
        return self.encode(self.virtual_save(images)).float()
