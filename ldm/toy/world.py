"""Procedural toy world with known ground truth.

Every image is 32x32 RGB with exactly one flat-coloured object on a uniform
grey background.  The attributes of the object are known exactly:

* ``shape``      one of :data:`SHAPES` (axis-aligned, no rotation);
* ``colour``     one of the named saturated hues in :data:`COLOURS`, spaced
  exactly 60 degrees apart in hue and all with the same chroma, so that they
  are far from each other and from every grey of :data:`BACKGROUNDS`;
* ``size``       the *equivalent radius* ``sqrt(area / pi)`` in pixels, drawn
  uniformly from :data:`SIZE_RANGE`; every shape is scaled so that its area is
  ``pi * size**2``, which makes size readable from the area alone whatever the
  shape; ``size_class`` is ``"small"`` below :data:`SIZE_THRESHOLD`, else
  ``"large"``;
* ``cx, cy``     the object's centroid in continuous pixel coordinates (pixel
  ``j`` covers ``[j, j + 1]``), constrained so that the whole object stays at
  least :data:`MARGIN` pixels inside the image;
* ``background`` a grey level from :data:`BACKGROUNDS`.

Images are rendered with 8x8 supersampling (anti-aliasing) and quantised to
8-bit levels, so an image survives a PNG round trip bit-exactly and
:func:`make_dataset` returns the same bytes on every run for a given seed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

IMAGE_SIZE = 32
SUPERSAMPLE = 8
MARGIN = 1.0  # minimum gap (px) between the object and the image border

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "yellow": (0.9, 0.9, 0.1),
    "green": (0.1, 0.9, 0.1),
    "cyan": (0.1, 0.9, 0.9),
    "blue": (0.1, 0.1, 0.9),
    "magenta": (0.9, 0.1, 0.9),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = (0.2, 0.4, 0.6, 0.8)
SIZE_RANGE = (4.5, 8.5)
SIZE_THRESHOLD = 6.5
SIZE_CLASSES = ("small", "large")

# Geometry of each shape for equivalent radius r = 1 (area = pi):
#   square   half side   s = sqrt(pi) / 2
#   triangle equilateral, pointing up, circumradius R = side / sqrt(3) with
#            side = sqrt(4 pi / sqrt(3)); centroid = circumcentre
#   cross    plus sign, arm half-length L, arm half-width L / 3, area 20 L^2 / 9
_SQUARE_HALF = math.sqrt(math.pi) / 2
_TRI_SIDE = math.sqrt(4 * math.pi / math.sqrt(3))
_TRI_R = _TRI_SIDE / math.sqrt(3)
_CROSS_L = math.sqrt(9 * math.pi / 20)
_CROSS_W = _CROSS_L / 3


@dataclass(frozen=True)
class Attributes:
    """Ground-truth attributes of one toy image."""

    shape: str
    colour: str
    size: float
    size_class: str
    cx: float
    cy: float
    background: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Attributes":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def size_class_of(size: float) -> str:
    return "small" if size < SIZE_THRESHOLD else "large"


def half_extents(shape: str, size: float) -> tuple[float, float, float, float]:
    """Extent of the shape around its centroid: (left, right, up, down) in px."""
    if shape == "circle":
        e = size
        return e, e, e, e
    if shape == "square":
        e = _SQUARE_HALF * size
        return e, e, e, e
    if shape == "triangle":
        half_side, r = _TRI_SIDE * size / 2, _TRI_R * size
        return half_side, half_side, r, r / 2
    if shape == "cross":
        e = _CROSS_L * size
        return e, e, e, e
    raise ValueError(f"unknown shape {shape!r}")


def coverage_mask(shape: str, size: float, cx: float, cy: float,
                  supersample: int = SUPERSAMPLE, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage (0..1) of the shape on the pixel grid, float32 HxW.

    Each pixel is the mean of ``supersample**2`` point samples; only the
    pixels of the object's bounding box are evaluated.
    """
    left, right, up, down = half_extents(shape, size)
    x0, x1 = max(0, int(cx - left)), min(image_size, int(math.ceil(cx + right)))
    y0, y1 = max(0, int(cy - up)), min(image_size, int(math.ceil(cy + down)))
    cov = np.zeros((image_size, image_size), np.float32)
    if x1 <= x0 or y1 <= y0:
        return cov
    k = supersample
    x = (x0 + (np.arange((x1 - x0) * k) + 0.5) / k)[None, :] - cx
    y = (y0 + (np.arange((y1 - y0) * k) + 0.5) / k)[:, None] - cy
    if shape == "circle":
        inside = x * x + y * y <= size * size
    elif shape == "square":
        h = _SQUARE_HALF * size
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "triangle":
        r = _TRI_R * size
        # apex at (0, -r), base at y = r / 2; the sides have slope sqrt(3)
        inside = (y <= r / 2) & (math.sqrt(3) * np.abs(x) <= y + r)
    elif shape == "cross":
        length, width = _CROSS_L * size, _CROSS_W * size
        ax, ay = np.abs(x), np.abs(y)
        inside = ((ax <= length) & (ay <= width)) | ((ax <= width) & (ay <= length))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    box = inside.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3), dtype=np.float32)
    cov[y0:y1, x0:x1] = box
    return cov


def render(attrs: Attributes) -> np.ndarray:
    """Render one image as float32 HxWx3 in [0, 1], quantised to 1/255 steps."""
    alpha = coverage_mask(attrs.shape, attrs.size, attrs.cx, attrs.cy)[..., None]
    colour = np.asarray(COLOURS[attrs.colour], dtype=np.float32)
    img = alpha * colour + (1.0 - alpha) * np.float32(attrs.background)
    return (np.round(img * 255.0) / 255.0).astype(np.float32)


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """Draw attributes uniformly: shape, colour, background, size, then position."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    size = float(rng.uniform(*SIZE_RANGE))
    left, right, up, down = half_extents(shape, size)
    cx = float(rng.uniform(MARGIN + left, IMAGE_SIZE - MARGIN - right))
    cy = float(rng.uniform(MARGIN + up, IMAGE_SIZE - MARGIN - down))
    return Attributes(shape, colour, size, size_class_of(size), cx, cy, float(background))


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[Attributes]]:
    """``n`` images as a float32 tensor [N, 3, 32, 32] in [0, 1] plus their attributes.

    Fully deterministic: the same ``(n, seed)`` gives the same bytes on every run,
    and the first ``k`` items do not depend on ``n``.
    """
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng) for _ in range(n)]
    images = np.stack([render(a) for a in attrs]) if n else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), attrs


def labels(attrs: list[Attributes]) -> dict[str, torch.Tensor]:
    """Integer / float label tensors for a list of attributes (used for training)."""
    return {
        "shape": torch.tensor([SHAPES.index(a.shape) for a in attrs]),
        "colour": torch.tensor([COLOUR_NAMES.index(a.colour) for a in attrs]),
        "size": torch.tensor([a.size for a in attrs], dtype=torch.float32),
        "size_class": torch.tensor([SIZE_CLASSES.index(a.size_class) for a in attrs]),
        "position": torch.tensor([[a.cx, a.cy] for a in attrs], dtype=torch.float32),
        "background": torch.tensor([BACKGROUNDS.index(a.background) for a in attrs]),
    }


def to_uint8(image) -> np.ndarray:
    """CHW/HWC float tensor or array in [0, 1] -> HxWx3 uint8 array."""
    x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if x.ndim == 3 and x.shape[0] == 3 and x.shape[-1] != 3:
        x = x.transpose(1, 2, 0)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def load_image(path: str) -> torch.Tensor:
    """Read a PNG as a float32 tensor [3, H, W] in [0, 1]."""
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def save_samples(path: str, n: int = 8, seed: int = 0) -> list[Attributes]:
    """Write ``n`` sample targets as PNGs plus ``attributes.json`` into ``path``.

    Sample ``i`` has shape ``SHAPES[i % 4]`` and colour ``COLOUR_NAMES[i % 6]``
    (so 8 samples cover every shape and all six colours); size, position and
    background are random but deterministic given ``seed``.
    """
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    records, out = {}, []
    for i in range(n):
        shape, colour = SHAPES[i % len(SHAPES)], COLOUR_NAMES[i % len(COLOUR_NAMES)]
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        size = float(rng.uniform(*SIZE_RANGE))
        left, right, up, down = half_extents(shape, size)
        cx = float(rng.uniform(MARGIN + left, IMAGE_SIZE - MARGIN - right))
        cy = float(rng.uniform(MARGIN + up, IMAGE_SIZE - MARGIN - down))
        a = Attributes(shape, colour, size, size_class_of(size), cx, cy, float(background))
        name = f"toy_{i:02d}_{colour}_{shape}.png"
        Image.fromarray(to_uint8(render(a))).save(os.path.join(path, name))
        records[name] = a.to_dict()
        out.append(a)
    with open(os.path.join(path, "attributes.json"), "w") as f:
        json.dump(records, f, indent=2)
    return out
