"""The feature-extractor interface: what the decoder needs to know about a target model.

An extractor maps images to one feature vector per image. It knows nothing about diffusion or
guidance. Subclasses set the preprocessing constants and implement `encode`; everything else
(the target transform and the differentiable "virtual save" of generated images) is shared.
"""
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF


class TextTargetNotSupported(ValueError):
    pass


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


class FeatureExtractor(nn.Module):
    """Base class. Subclasses set `name`, `input_size`, `mean`, `std` and implement `encode`.

    - `input_size`: side of the square image the model sees (224 for ResNet-50, 518 for ViT-H/14).
    - `antialias`: whether the bicubic resize of generated images is antialiased. The reference
      left it to the torchvision default (off up to 0.16, on from 0.17); we choose explicitly.
    - `log_cosine`: the log lines of this extractor carry the cosine similarity (CLIP scripts).
    """

    name: str = "extractor"
    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    antialias: bool = True
    log_cosine: bool = False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, S, S] → features [B, D]."""
        raise NotImplementedError

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        raise TextTargetNotSupported(
            f"{self.name} only supports image targets: give --prompt a path to an image "
            "(text prompts need a text tower, e.g. scripts/clip_guided2.py)")

    @classmethod
    def supports_text(cls) -> bool:
        return cls.encode_text is not FeatureExtractor.encode_text

    def freeze(self) -> "FeatureExtractor":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: batch-norm statistics and dropout stay in eval mode

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- targets ------------------------------------------------------------------------------
    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """PIL target → [1, 3, S, S]: resize the shorter side to S (bicubic), centre crop,
        RGB, to tensor, normalise (the reference's target transform)."""
        image = to_rgb(image)
        image = TF.resize(image, self.input_size, interpolation=InterpolationMode.BICUBIC)
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
        """Generated images in [-1, 1] → float32 features [B, D]."""
        return self.encode(self.virtual_save(images)).float()
