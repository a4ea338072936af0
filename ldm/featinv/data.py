"""FeatInv's training pairs: an image and the same image as the extractor sees it.

Every item is a dict with
- "image": [3, R, R] in [-1, 1] at the base model's resolution R (what the LDM learns to make),
- "pixels": [3, S, S], the extractor's input: the same crop at its input size S with its own
  interpolation and normalisation (its feature, the hint, is computed from this),
- "index": the item's index (validation draws its fixed noise from it).

An image folder gives FeatInv's augmentation (RandomResizedCrop, horizontal and vertical flips;
validation: the centre square); the toy world generates its images on the fly from fixed seeds.
`CachedPairs` holds what training computes from a pair, for data without augmentation (the toy
world): the latent posterior's mean and std and the hint.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
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


def open_rgb(path: Path) -> Image.Image | None:
    """The image at `path` as RGB (raster formats only: ldm/images.py); None if it cannot be
    read (corrupt, truncated, a decompression bomb, not an image), with a warning naming it."""
    try:
        return read_rgb(path)
    except ImageFileError as err:
        print(f"warning: skipping {err}", file=sys.stderr)
        return None


def skip_unreadable(items: list[dict | None]) -> dict:
    """The loader's collate: the readable items batched, with "skipped": how many were not."""
    readable = [item for item in items if item is not None]
    batch = default_collate(readable) if readable else {}
    return {**batch, "skipped": torch.tensor(len(items) - len(readable))}


class ImageFolderPairs(Dataset):
    """Training pairs from image files: random crops if `augment`, else the centre square."""

    def __init__(self, files: list[Path], resolution: int, preprocessing: Preprocessing,
                 augment: bool):
        self.files, self.resolution = list(files), resolution
        self.preprocessing, self.augment = preprocessing, augment

    def __len__(self) -> int:
        return len(self.files)

    def _box(self, image: Image.Image) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop."""
        if self.augment:
            return RandomResizedCrop.get_params(image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        side = min(image.size)
        return (image.height - side) // 2, (image.width - side) // 2, side, side

    def __getitem__(self, index: int) -> dict | None:
        image = open_rgb(self.files[index])
        if image is None:
            return None
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


class CachedPairs(Dataset):
    """Precomputed training inputs: item k is {"latent_mean", "latent_std": the first stage's
    posterior of image k (unscaled; training samples from it), "hint": its feature's hint}."""

    def __init__(self, latent_mean: torch.Tensor, latent_std: torch.Tensor, hint: torch.Tensor):
        if not len(latent_mean) == len(latent_std) == len(hint):
            raise ValueError("latent means, stds and hints of different lengths")
        self.latent_mean, self.latent_std, self.hint = latent_mean, latent_std, hint

    def __len__(self) -> int:
        return len(self.hint)

    def __getitem__(self, index: int) -> dict:
        return {"latent_mean": self.latent_mean[index], "latent_std": self.latent_std[index],
                "hint": self.hint[index], "index": index}
