"""Attribute oracle: reads shape, colour, size and position from any 32x32 image.

Everything except the shape is *measured*:

* background: per-channel median of the 1-px border ring (objects never touch
  it), snapped to the nearest grey of :data:`world.BACKGROUNDS`;
* object colour ``c``: median colour of the object's interior, found from a
  rough mask (pixels far from the background, largest blob);
* coverage ``alpha = <p - bg, c - bg> / |c - bg|^2`` per pixel, which undoes
  the anti-aliasing blend; object mask = largest blob of ``alpha > 0.5``;
* colour name: nearest named hue to the hue of ``c`` (blending with grey keeps
  the hue, so edges and blur do not bias it);
* size: ``sqrt(area / pi)`` with ``area`` = sum of ``alpha`` over the dilated
  mask (the generator's size unit is exactly this equivalent radius);
* position: ``alpha``-weighted centroid.

Shape is decided by analysis by synthesis: the four shapes are rendered at
the measured size and centroid (each also slightly blurred) and the one with
the best soft IoU against the measured coverage wins.  This geometric rule is
exact on clean images and beat a CNN trained with noise / blur / warp
augmentation on every degradation we tried (see ``models/toy/metrics.json``).
That CNN (``models/toy/oracle_shape.safetensors``, a network separate from the
target extractors) is kept as a second opinion: ``Reading.shape_cnn``;
``Oracle(primary="cnn")`` makes it decide.

``clean`` flags images that look like the world: one connected blob of a
saturated named hue on a uniform grey background with few stray pixels, whose
outline matches one of the shapes (:func:`clean_checks` lists the tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import world

_SQRT3_2 = math.sqrt(3) / 2
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# thresholds of the measurements and of the `clean` flag (values in [0, 1] units)
ROUGH_DIST = 0.25        # rough mask: |p - bg| on the 3x3-smoothed image
GREY_CHROMA_MAX = 0.06   # background must be grey
MIN_CHROMA = 0.4         # object must be saturated (named colours have 0.8)
MAX_HUE_ERR = 20.0       # degrees from the nearest named hue
MAX_STRAY = 3            # mask pixels outside the main blob
OUTSIDE_DEV = 0.15       # a (3x3-smoothed) background pixel deviating more is "dirty"
OUTSIDE_DIRTY_MAX = 0.02 # fraction of dirty background pixels allowed
INSIDE_DEV_MAX = 0.12    # 90th pct of the off-colour-axis deviation inside the object
AREA_RANGE = (math.pi * 3.0 ** 2, math.pi * 10.0 ** 2)
MIN_SHAPE_IOU = 0.7      # best template IoU (>= 0.74 even for warped + blurred + noisy world images)


def chroma_hue(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chroma and hue (degrees in [0, 360)) of RGB colours [..., 3] (opponent axes)."""
    a = rgb[..., 0] - 0.5 * (rgb[..., 1] + rgb[..., 2])
    b = _SQRT3_2 * (rgb[..., 1] - rgb[..., 2])
    return torch.hypot(a, b), torch.rad2deg(torch.atan2(b, a)) % 360.0


_NAMED_HUES = chroma_hue(torch.tensor(list(world.COLOURS.values())))[1]


def connected_components(mask: torch.Tensor, iters: int = 256) -> torch.Tensor:
    """8-connected component labels of boolean masks [N, H, W] (0 = background).

    Labels are propagated by iterated 3x3 max-pooling until stable.
    """
    n, h, w = mask.shape
    idx = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(n, h, w)
    lab = torch.where(mask, idx, torch.zeros(()))
    m = mask.float()
    for _ in range(iters):
        new = F.max_pool2d(lab.unsqueeze(1), 3, 1, 1).squeeze(1) * m
        if torch.equal(new, lab):
            break
        lab = new
    return lab.long()


def largest_component(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(main blob mask, number of blobs of >= 2 px, stray pixel count) per image."""
    lab = connected_components(mask)
    n = lab.shape[0]
    counts = torch.zeros(n, lab[0].numel() + 1, dtype=torch.long)
    counts.scatter_add_(1, lab.view(n, -1), torch.ones_like(lab.view(n, -1)))
    counts[:, 0] = 0
    best = counts.argmax(1)
    main = (lab == best.view(n, 1, 1)) & mask
    n_blobs = (counts >= 2).sum(1)
    stray = mask.sum((1, 2)) - main.sum((1, 2))
    return main, n_blobs, stray


def _masked_quantile(v: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile of v [N, M] over mask [N, M]; NaN for empty rows."""
    return torch.nanquantile(torch.where(mask, v, torch.full_like(v, float("nan"))), q, dim=1)


def _norm(v: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over dim 1 (the colour channels)."""
    return (v * v).sum(1).sqrt()


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(mask.float().unsqueeze(1), 3, 1, 1).squeeze(1) > 0


@dataclass
class Reading:
    """Attributes read from one image plus diagnostics.

    ``shape_iou`` holds the soft IoU of each shape template (order of
    :data:`world.SHAPES`); ``shape_cnn`` / ``shape_cnn_probs`` the second
    opinion of the oracle's CNN (empty without one); ``checks`` the tests
    behind ``clean``.
    """

    shape: str
    colour: str
    size: float
    size_class: str
    cx: float
    cy: float
    background: float
    clean: bool
    shape_iou: list = field(default_factory=list)
    shape_cnn: str = ""
    shape_cnn_probs: list = field(default_factory=list)
    hue: float = 0.0
    chroma: float = 0.0
    object_rgb: tuple = (0.0, 0.0, 0.0)
    background_level: float = 0.0
    checks: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def attributes(self) -> world.Attributes:
        return world.Attributes(self.shape, self.colour, self.size, self.size_class,
                                self.cx, self.cy, self.background)


@torch.no_grad()
def measure(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact measurements on a batch [N, 3, H, W] in [0, 1] (everything but shape)."""
    x = images.detach().float().clamp(0, 1).cpu()
    n, _, h, w = x.shape
    ring = torch.zeros(h, w, dtype=torch.bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    border = x[:, :, ring]                                        # [N, 3, B]
    bg = border.median(dim=2).values                              # [N, 3]
    diff = x - bg[..., None, None]                                # [N, 3, H, W]
    # uniformity is judged on a 3x3-smoothed image (pixel grain is ignored)
    smooth = F.avg_pool2d(F.pad(diff, (1, 1, 1, 1), mode="replicate"), 3, 1)
    border_dev = torch.quantile(_norm(border - bg[..., None]), 0.9, dim=1)  # diagnostic only
    bg_level = bg.mean(1)
    bg_chroma = chroma_hue(bg)[0]

    # rough mask on the smoothed image, keep the largest blob
    rough, _, _ = largest_component(_norm(smooth) > ROUGH_DIST)
    flat_rough = rough.view(n, -1)
    dflat = diff.view(n, 3, -1)
    # object colour: median colour of the interior (pixels close to the top projection)
    mean_dir = (dflat * flat_rough[:, None]).sum(2) / flat_rough.sum(1, keepdim=True).clamp(min=1)
    u = mean_dir / mean_dir.norm(dim=1, keepdim=True).clamp(min=1e-6)
    proj = (dflat * u[..., None]).sum(1)                          # [N, HW]
    top = _masked_quantile(proj, flat_rough, 0.9).nan_to_num(1.0)
    interior = flat_rough & (proj >= 0.75 * top[:, None])
    nanv = torch.full_like(dflat, float("nan"))
    obj_diff = torch.where(interior[:, None], dflat, nanv).nanmedian(dim=2).values.nan_to_num(0.0)
    obj_rgb = (bg + obj_diff).clamp(0, 1)
    v = obj_diff / (obj_diff * obj_diff).sum(1, keepdim=True).clamp(min=1e-4)
    u_obj = obj_diff / obj_diff.norm(dim=1, keepdim=True).clamp(min=1e-2)
    alpha = (dflat * v[..., None]).sum(1).view(n, h, w)
    main, n_blobs, stray = largest_component(alpha > 0.5)
    region = _dilate(main)
    a = torch.where(region, alpha.clamp(-0.5, 1.5), torch.zeros(()))
    area = a.sum((1, 2))
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    safe = area.clamp(min=1e-6)
    cx = torch.where(area > 0, (a * xs).sum((1, 2)) / safe, torch.full_like(area, w / 2))
    cy = torch.where(area > 0, (a * ys).sum((1, 2)) / safe, torch.full_like(area, h / 2))
    chroma, hue = chroma_hue(obj_rgb)
    hue_err = (hue[:, None] - _NAMED_HUES[None]).abs()
    hue_err = torch.minimum(hue_err, 360 - hue_err)
    hue_err, colour_idx = hue_err.min(1)
    # cleanliness diagnostics
    dist = _norm(smooth)
    outside = ~_dilate(region)
    dirty = ((dist > OUTSIDE_DEV) & outside).sum((1, 2)) / outside.sum((1, 2)).clamp(min=1)
    # colour uniformity inside the object: the part of (p - bg) orthogonal to the
    # object colour (anti-aliasing, blur and shading only move along it)
    sflat = smooth.view(n, 3, -1)
    along = (sflat * u_obj[..., None]).sum(1, keepdim=True) * u_obj[..., None]
    core = (~_dilate(~main)).view(n, -1)  # eroded mask
    inside_dev = _masked_quantile(_norm(sflat - along), core, 0.9).nan_to_num(0.0)
    return {"bg_rgb": bg, "bg_level": bg_level, "bg_chroma": bg_chroma, "border_dev": border_dev,
            "obj_rgb": obj_rgb, "chroma": chroma, "hue": hue, "hue_err": hue_err, "colour": colour_idx,
            "alpha": alpha, "mask": main, "area": area, "size": (area.clamp(min=0) / math.pi).sqrt(),
            "cx": cx, "cy": cy, "n_blobs": n_blobs, "stray": stray, "dirty": dirty,
            "inside_dev": inside_dev}


def clean_checks(m: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Boolean checks behind the ``clean`` flag, from :func:`measure` output plus
    ``shape_iou`` (best template IoU of :func:`geometric_shape_scores`)."""
    return {
        "grey_background": m["bg_chroma"] < GREY_CHROMA_MAX,
        "saturated": m["chroma"] > MIN_CHROMA,
        "named_hue": m["hue_err"] < MAX_HUE_ERR,
        "one_blob": (m["n_blobs"] == 1) & (m["stray"] <= MAX_STRAY),
        "clean_background": m["dirty"] <= OUTSIDE_DIRTY_MAX,
        "uniform_object": m["inside_dev"] < INSIDE_DEV_MAX,
        "plausible_area": (m["area"] >= AREA_RANGE[0]) & (m["area"] <= AREA_RANGE[1]),
        "shape_match": m["shape_iou"] >= MIN_SHAPE_IOU,
    }


def geometric_shape_scores(m: dict[str, torch.Tensor], blurs=(0.0, 0.6, 1.2)) -> torch.Tensor:
    """Analysis by synthesis: soft IoU [N, 4] between the measured coverage and
    each shape rendered at the measured size and centroid, best over a few
    template blurs (so blurry images still match their own shape best)."""
    alpha = (m["alpha"].clamp(0, 1) * _dilate(_dilate(m["mask"]))).unsqueeze(1)
    scores = torch.zeros(alpha.shape[0], len(world.SHAPES))
    for i in range(alpha.shape[0]):
        size, cx, cy = float(m["size"][i]), float(m["cx"][i]), float(m["cy"][i])
        if size <= 0:
            continue
        t = torch.from_numpy(np.stack([world.coverage_mask(s, size, cx, cy, supersample=4)
                                       for s in world.SHAPES]))[:, None]
        t = torch.stack([gaussian_blur(t, b) for b in blurs], 1).squeeze(2)     # [4, B, H, W]
        iou = torch.minimum(t, alpha[i]).sum((2, 3)) / torch.maximum(t, alpha[i]).sum((2, 3)).clamp(min=1e-6)
        scores[i] = iou.max(1).values
    return scores


class Oracle:
    """Reads :class:`Reading` s from images.

    ``shape_net``: optional SmallCNN with a ``shape`` head (second opinion);
    ``primary``: ``"geometric"`` (default) or ``"cnn"`` decides ``Reading.shape``.
    """

    def __init__(self, shape_net=None, primary: str = "geometric"):
        if primary not in ("geometric", "cnn") or (primary == "cnn" and shape_net is None):
            raise ValueError("primary must be 'geometric', or 'cnn' with a shape_net")
        self.shape_net = shape_net.eval() if shape_net is not None else None
        self.primary = primary

    @classmethod
    def load(cls, path: str | None = None, primary: str = "geometric") -> "Oracle":
        """Oracle with the shipped CNN (default ``models/toy/oracle_shape.safetensors``)."""
        from .nets import load_net

        path = path or os.path.join(_REPO, "models", "toy", "oracle_shape.safetensors")
        return cls(load_net(path), primary)

    @torch.no_grad()
    def read_batch(self, images: torch.Tensor, batch_size: int = 500) -> list[Reading]:
        """Readings for images [N, 3, 32, 32] (or one [3, 32, 32]) in [0, 1]."""
        if images.dim() == 3:
            images = images.unsqueeze(0)
        out = []
        for k in range(0, len(images), batch_size):
            out += self._read(images[k:k + batch_size])
        return out

    def read(self, image: torch.Tensor) -> Reading:
        return self.read_batch(image)[0]

    def _read(self, x: torch.Tensor) -> list[Reading]:
        m = measure(x)
        geo = geometric_shape_scores(m)
        m["shape_iou"] = geo.max(1).values
        checks = clean_checks(m)
        clean = torch.stack(list(checks.values()), 1).all(1)
        probs = None
        if self.shape_net is not None:
            dev = next(self.shape_net.parameters()).device
            probs = self.shape_net(x.float().clamp(0, 1).to(dev))["shape"].softmax(-1).cpu()
        shape_idx = probs.argmax(1) if self.primary == "cnn" else geo.argmax(1)
        bg_idx = (m["bg_level"][:, None] - torch.tensor(world.BACKGROUNDS)[None]).abs().argmin(1)
        res = []
        for i in range(len(x)):
            size = float(m["size"][i])
            res.append(Reading(
                shape=world.SHAPES[int(shape_idx[i])],
                colour=world.COLOUR_NAMES[int(m["colour"][i])],
                size=size, size_class=world.size_class_of(size),
                cx=float(m["cx"][i]), cy=float(m["cy"][i]),
                background=float(world.BACKGROUNDS[int(bg_idx[i])]),
                clean=bool(clean[i]),
                shape_iou=[round(float(v), 4) for v in geo[i]],
                shape_cnn=world.SHAPES[int(probs[i].argmax())] if probs is not None else "",
                shape_cnn_probs=[round(float(v), 4) for v in probs[i]] if probs is not None else [],
                hue=float(m["hue"][i]), chroma=float(m["chroma"][i]),
                object_rgb=tuple(round(float(v), 4) for v in m["obj_rgb"][i]),
                background_level=float(m["bg_level"][i]),
                checks={k: bool(v[i]) for k, v in checks.items()},
            ))
        return res


# ----------------------------------------------------------------- degradations
def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W] images (reflect padding)."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def warp(x: torch.Tensor, amplitude: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Smooth random elastic warp (displacements up to about ``amplitude`` px)."""
    if amplitude <= 0:
        return x
    n, _, h, w = x.shape
    field = torch.randn(n, 2, 4, 4, generator=generator) * (amplitude / 2)
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xs, ys], -1).unsqueeze(0) + field.permute(0, 2, 3, 1) * (2.0 / w)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def degrade(x: torch.Tensor, noise: float = 0.0, blur: float = 0.0, warp_px: float = 0.0,
            seed: int = 0) -> torch.Tensor:
    """Warp, blur, then add Gaussian noise (std ``noise``), clamp to [0, 1]; deterministic."""
    g = torch.Generator().manual_seed(seed)
    y = gaussian_blur(warp(x, warp_px, g), blur)
    if noise > 0:
        y = y + noise * torch.randn(y.shape, generator=g)
    return y.clamp(0, 1)


# name -> degrade() keyword arguments, used to report the oracle's robustness
DEGRADATIONS = {
    "clean": {},
    "noise0.05": {"noise": 0.05},
    "noise0.10": {"noise": 0.10},
    "blur0.7": {"blur": 0.7},
    "blur1.2": {"blur": 1.2},
    "warp1.5": {"warp_px": 1.5},
    "warp1.5+blur0.8+noise0.05": {"warp_px": 1.5, "blur": 0.8, "noise": 0.05},
}


def score(readings: list[Reading], truth: list[world.Attributes]) -> dict[str, float]:
    """Accuracy of readings against ground truth."""
    n = len(truth)
    pos = np.array([math.hypot(r.cx - t.cx, r.cy - t.cy) for r, t in zip(readings, truth)])
    size_err = np.array([abs(r.size - t.size) for r, t in zip(readings, truth)])
    return {
        "n": n,
        "shape_acc": sum(r.shape == t.shape for r, t in zip(readings, truth)) / n,
        "shape_cnn_acc": (sum(r.shape_cnn == t.shape for r, t in zip(readings, truth)) / n
                          if readings and readings[0].shape_cnn else float("nan")),
        "colour_acc": sum(r.colour == t.colour for r, t in zip(readings, truth)) / n,
        "size_class_acc": sum(r.size_class == t.size_class for r, t in zip(readings, truth)) / n,
        "background_acc": sum(r.background == t.background for r, t in zip(readings, truth)) / n,
        "size_mae_px": float(size_err.mean()),
        "size_max_err_px": float(size_err.max()),
        "pos_err_mean_px": float(pos.mean()),
        "pos_err_p99_px": float(np.quantile(pos, 0.99)),
        "pos_err_max_px": float(pos.max()),
        "clean_rate": sum(r.clean for r in readings) / n,
    }
