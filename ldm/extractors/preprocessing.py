"""How images become a model's input, as one record per model (`Preprocessing`), and how its
layer outputs become features (`Readout`).

Targets (PIL images): RGB (any mode, EXIF orientation applied, high-bit-depth and float images
scaled), resize of the shorter side (or of both sides, "squash") to `resize_size` with
`interpolation`, centre crop to `input_size`, normalise with `mean` and `std`.

Generated images (tensors in [-1, 1], differentiable): the reference's "virtual save" — ×255,
straight-through rounding to 8 bits, resize, rounding again, /255, normalise, without clamping.
Its resize is the paper models' definition ("reference": both sides to `input_size`, bicubic,
antialiased) or the targets' own geometry and interpolation ("target": the same resize and
centre crop as the target transform), so that a generated image's feature is computed the way
the target's was.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tiff_tag(image: Image.Image, tag: int):
    value = getattr(image, "tag_v2", {}).get(tag)
    return value[0] if isinstance(value, tuple) else value


def _full_scale(image: Image.Image, values: np.ndarray) -> float:
    """The value that means white in a single-channel high-bit-depth or float image (`image`
    as opened: its TIFF tags say the bit depth and signedness)."""
    if image.mode == "F":
        if values.min(initial=0) >= 0 and values.max(initial=0) <= 1:
            return 1.0                                    # float images in [0, 1]
        if values.min(initial=0) >= 0 and values.max(initial=0) <= 255:
            return 255.0
        raise ValueError(f"a floating-point image with values in [{values.min():g}, "
                         f"{values.max():g}]: give one in [0, 1] (or [0, 255]), or an 8/16-bit image")
    if image.mode.startswith("I;16") or _tiff_tag(image, 258) == 16:   # TIFF BitsPerSample
        return 65535.0
    # 32-bit integers ("I": a TIFF, or a PNG's 16 bits): the smallest usual range that holds the
    # values (8-bit data stored as 32-bit is not near-black)
    top = values.max(initial=0)
    return next(scale for scale in (255.0, 65535.0, 2.0 ** 31 - 1, 2.0 ** 32 - 1) if top <= scale)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → 8-bit RGB, upright: EXIF orientation applied, then `.convert("RGB")` as
    the reference's loader did (grey, palette, RGBA, CMYK ...). Single-channel images of more
    than 8 bits ("I;16*", "I": 16- and 32-bit integers; "F": 32-bit floats in [0, 1]) are first
    scaled from their full range to 8 bits, which `.convert` would instead clip (to white, or,
    for floats in [0, 1], to black). ValueError for a float image outside [0, 255]."""
    upright = ImageOps.exif_transpose(image)   # a copy: the TIFF tags stay on `image`
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(upright).astype(np.float64)
        scaled = values.clip(0, None) * (255.0 / _full_scale(image, values))
        upright = Image.fromarray(np.round(scaled.clip(0, 255)).astype(np.uint8))  # mode L
    return upright.convert("RGB")


def round_straight_through(x: torch.Tensor) -> torch.Tensor:
    """Forward value round(x), gradient of the identity."""
    return x + (torch.round(x) - x).detach()


@dataclass(frozen=True)
class Preprocessing:
    """A model's input: `input_size` square pixels (224 for ResNet-50, 518 for ViT-H/14).

    - `resize_size`, `interpolation`, `resize_mode`: targets are resized (shorter side, or both
      sides for "squash") to `resize_size` (None: `input_size`), then centre-cropped.
    - `antialias`: the tensor resize of generated images is antialiased (the reference left it
      to torchvision's default, which changed in 0.17; we choose explicitly).
    - `generated`: "reference" (the paper models' virtual save) or "target" (see the module)."""

    input_size: int = 224
    resize_size: int | None = None
    interpolation: InterpolationMode = InterpolationMode.BICUBIC
    resize_mode: str = "shorter"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    antialias: bool = True
    generated: str = "reference"

    def to_json(self) -> dict:
        return {**asdict(self), "interpolation": self.interpolation.value}

    def _resize(self, image, size: int):
        side = [size, size] if self.resize_mode == "squash" else size
        if isinstance(image, torch.Tensor):
            return TF.resize(image, side, interpolation=self.interpolation, antialias=self.antialias)
        return TF.resize(image, side, interpolation=self.interpolation)

    def target(self, image: Image.Image) -> torch.Tensor:
        """PIL target → normalised [1, 3, S, S]."""
        image = TF.center_crop(self._resize(to_rgb(image), self.resize_size or self.input_size),
                               self.input_size)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std).unsqueeze(0)

    def generated_images(self, images: torch.Tensor) -> torch.Tensor:
        """Generated images in [-1, 1] → normalised model input (differentiable virtual save)."""
        x = round_straight_through((images + 1) / 2 * 255)
        size = self.input_size
        if self.generated == "target":
            x = TF.center_crop(self._resize(x, self.resize_size or size), size)
        elif x.shape[-2:] != (size, size):
            x = TF.resize(x, [size, size], interpolation=InterpolationMode.BICUBIC,
                          antialias=self.antialias)
        return TF.normalize(round_straight_through(x) / 255, self.mean, self.std)


@dataclass(frozen=True)
class Readout:
    """How a layer's output is read (ldm/extractors/layers.py): [B, N, C] token sequences start
    with `prefix_tokens` non-patch tokens (the first a class token if `class_token`); 4-D maps
    are [B, H, W, C] if `channels_last`; patch tokens form a `token_grid` (h, w) (None: square)."""

    prefix_tokens: int = 0
    class_token: bool = False
    channels_last: bool = False
    token_grid: tuple[int, int] | None = None
