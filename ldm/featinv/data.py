"""FeatInv's training pairs: an image and the same image as the extractor sees it.

Every item is a dict with
- "image": [3, R, R] in [-1, 1] at the base model's resolution R (what the LDM learns to make),
- "pixels": [3, S, S], the extractor's input: the same crop at its input size S with its own
  interpolation and normalisation (its feature, the hint, is computed from this),
- "index": the item's index (validation draws its fixed noise from it).

An image folder gives FeatInv's augmentation (RandomResizedCrop, horizontal and vertical flips;
validation: the centre square); the toy world generates its images on the fly from fixed seeds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from ldm.extractors.preprocessing import Preprocessing
from ldm.images import IMAGE_SUFFIXES, ImageFileError, read_rgb
from ldm.toy import world


def normalised(x: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """[3, S, S] in [0, 1] → the extractor's input (its mean and std)."""
    return TF.normalize(x, preprocessing.mean, preprocessing.std)


def list_images(folder: str | Path) -> list[Path]:
    """The image files under `folder` (recursively), sorted."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class ImageFolderPairs(Dataset):
    """Training pairs from image files: random crops if `augment`, else the centre square."""

    def __init__(self, files: list[Path], resolution: int, preprocessing: Preprocessing,
                 augment: bool):
        self.files, self.resolution = list(files), resolution
        self.preprocessing, self.augment = preprocessing, augment
        self.skipped: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _readable(self, index: int) -> Image.Image:
        """The image of `index`, or, if that file is broken (truncated, a decompression bomb, not
        an image), the next readable one: one bad file does not stop a training; each is
        reported once, with the count so far (per process)."""
        for k in range(len(self.files)):
            path = self.files[(index + k) % len(self.files)]
            try:
                return read_rgb(path)
            except ImageFileError as err:
                if path not in self.skipped:
                    self.skipped.add(path)
                    print(f"warning: skipping {err} ({len(self.skipped)} skipped so far)",
                          file=sys.stderr)
        raise ImageFileError(f"none of the {len(self.files)} images is readable")

    def _box(self, image: Image.Image) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop."""
        if self.augment:
            return RandomResizedCrop.get_params(image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        side = min(image.size)
        return (image.height - side) // 2, (image.width - side) // 2, side, side

    def __getitem__(self, index: int) -> dict:
        image = self._readable(index)
        box = self._box(image)
        flips = torch.rand(2) < 0.5 if self.augment else (False, False)
        p = self.preprocessing
        views = [TF.resized_crop(image, *box, [self.resolution] * 2,
                                 InterpolationMode.BICUBIC, antialias=True),
                 TF.resized_crop(image, *box, [p.input_size] * 2, p.interpolation, antialias=True)]
        views = [TF.to_tensor(v) for v in views]
        if flips[0]:
            views = [TF.hflip(v) for v in views]
        if flips[1]:
            views = [TF.vflip(v) for v in views]
        # bicubic overshoots a little: back into [0, 1] before the model's range
        image01, pixels = (v.clamp(0, 1) for v in views)
        return {"image": image01 * 2 - 1, "pixels": normalised(pixels, p), "index": index}


class ToyWorldPairs(Dataset):
    """`n` toy-world images; item k is drawn from its own generator (seed, k), so it is the
    same on every run, in every worker and for every `n`. No augmentation: flips and crops
    would leave the world (upright triangles, fixed sizes)."""

    def __init__(self, n: int, seed: int, resolution: int, preprocessing: Preprocessing):
        self.n, self.seed = n, seed
        self.resolution, self.preprocessing = resolution, preprocessing

    def __len__(self) -> int:
        return self.n

    def _at(self, x: torch.Tensor, size: int, interpolation) -> torch.Tensor:
        if x.shape[-1] == size:
            return x
        return TF.resize(x, [size, size], interpolation=interpolation, antialias=True).clamp(0, 1)

    def __getitem__(self, index: int) -> dict:
        attributes = world.sample_attributes(np.random.default_rng((self.seed, index)))
        x = torch.from_numpy(world.render(attributes)).permute(2, 0, 1)
        p = self.preprocessing
        image = self._at(x, self.resolution, InterpolationMode.BICUBIC)
        pixels = self._at(x, p.input_size, p.interpolation)
        return {"image": image * 2 - 1, "pixels": normalised(pixels, p), "index": index}
