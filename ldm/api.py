"""The Python entry point: decode target features into images, as the command line does.

    from ldm.api import decode, paper_settings

    results = decode(["data/examples/chelsea.jpg"], "torchvision:resnet50",
                     settings=paper_settings(clip=3.0), device="cuda", precision="bf16")
    results[0].final          # [3, H, W] in [0, 1]
    results[0].metrics        # squared distance and cosine of the final and the best image

`extractor` is a registry name (`ldm.extractors.build_extractor`: "torchvision:resnet50@layer3",
"open_clip:RN50", "timm:convnext_tiny", ...), a `FeatureExtractor`, or any `torch.nn.Module`
together with `preprocess` (a differentiable function of images in [0, 1], see
`ldm.extractors.ModuleExtractor`). Targets are the strings of `ldm.targets` (image paths, feature
files, text prompts, feature arithmetic such as
`image("cat.jpg") + 0.5 * (text("a dog") - text("a cat"))`), `Target`s, or feature tensors.

`FeatureDecoder` is the layer below: a loaded model and extractor that turns targets into
features and decodes batches of them with the sampler's callbacks (the command line,
ldm/guided_run.py, adds files, resumption and signals on top of it).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field, replace

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from ldm.extractors import FeatureExtractor, build_extractor
from ldm.extractors.base import to_rgb
from ldm.models.diffusion.feature_guidance import (BestImage, GuidanceSettings, GuidedResult,
                                                   sample_feature_guided)
from ldm.models.loading import DEFAULT_CKPT, DEFAULT_CONFIG, load_model
from ldm.objectives import FeatureDistance, cosine_similarity, parse_channels, squared_distance
from ldm.targets import Target, TargetError, expand_targets, load_feature_file, target_features

PRECISIONS = ("fp32", "bf16", "fp16")


def paper_settings(clip: float = 3.0, **changes) -> GuidanceSettings:
    """The settings of the paper's runs (README of the reference): forward guidance, w = 4,
    K = 1000 for the first 5 timesteps and 8 after (12,960 guided iterations), gradient clipping
    at `clip` (3.0 for CLIP RN50 and ResNet-50, 2.0 for ViT-H/14). `changes` override fields,
    e.g. `timesteps=100` for a respaced schedule."""
    base = GuidanceSettings(forward_guidance=True, forward_guidance_wt=4.0, grad_clip_threshold=clip,
                            num_steps=(1000, 8), early_emp_end=995)
    return replace(base, **changes)


def load_image(path: str) -> Image.Image:
    """A target image, fully read and checked to convert to RGB (any mode, 16-bit, EXIF)."""
    try:
        with Image.open(path) as image:
            image.load()
            image = image.copy()
        to_rgb(image)
        return image
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise TargetError(f"{path!r} is not a readable image: {err}") from err


def as_extractor(extractor: str | nn.Module, *, preprocess=None, weights: str | None = None,
                 spatial: bool = False, device="cpu") -> FeatureExtractor:
    """A registry name, a FeatureExtractor (moved to `device`) or any nn.Module (wrapped in a
    ModuleExtractor with `preprocess`)."""
    if isinstance(extractor, str):
        return build_extractor(extractor, weights=weights, device=device, spatial=spatial)
    if isinstance(extractor, FeatureExtractor):
        return extractor.to(device)
    if isinstance(extractor, nn.Module):
        from ldm.extractors import ModuleExtractor
        return ModuleExtractor(extractor, preprocess=preprocess, spatial=spatial).to(device)
    raise TypeError(f"extractor must be a registry name, a FeatureExtractor or an nn.Module, "
                    f"not {type(extractor).__name__}")


class TargetFeatures:
    """Turns targets into feature tensors with an extractor (no diffusion model needed)."""

    def __init__(self, extractor: FeatureExtractor):
        self.extractor = extractor
        self._feature_shape = None

    @property
    def device(self) -> torch.device:
        return self.extractor.device

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The extractor's feature shape without the batch dimension (one forward pass, once)."""
        if self._feature_shape is None:
            with torch.no_grad():
                self._feature_shape = self.extractor.feature_shape()
        return self._feature_shape

    def _leaf(self, kind: str, source: str) -> torch.Tensor:
        if kind == "image":
            return self.extractor.image_features(load_image(source))
        if kind == "text":
            return self.extractor.encode_text([source])
        return load_feature_file(source).to(self.device)

    def __call__(self, target: Target | str | torch.Tensor) -> torch.Tensor:
        """The target's feature tensor [1, ...] on the extractor's device. Warnings (e.g. a
        prompt cut to CLIP's 77 tokens) are passed on."""
        if isinstance(target, torch.Tensor):
            value = target.detach().float().to(self.device)
            if tuple(value.shape) == self.feature_shape:
                value = value.unsqueeze(0)
            if tuple(value.shape) != (1, *self.feature_shape):
                raise TargetError(f"target features of shape {tuple(target.shape)} do not match the "
                                  f"extractor's features {self.feature_shape}")
            return value
        if isinstance(target, str):
            target = expand_targets([target])[0]
        needs_shape = any(kind == "features" for kind, _ in target.leaves())
        with torch.no_grad():
            return target_features(target, self._leaf, self.feature_shape if needs_shape else None)

    def compare(self, features: torch.Tensor, goal: torch.Tensor, channels=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distance, cosine) of extracted features to the goal, on `channels`."""
        index = parse_channels(channels, goal.shape[1])
        if index is not None:
            index = torch.tensor(index, device=features.device)
            features, goal = features.index_select(1, index), goal.index_select(1, index.to(goal.device))
        goal = goal.to(features.device)
        return squared_distance(features, goal), cosine_similarity(features, goal)


class FeatureDecoder:
    """A loaded latent diffusion model and extractor, with the settings of a run."""

    def __init__(self, model, extractor: FeatureExtractor, settings: GuidanceSettings, *,
                 loss: str = "squared", channels=None, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.model, self.extractor, self.settings = model, extractor, settings
        self.loss, self.channels, self.precision = loss, channels, precision
        self.device = model.betas.device
        self.targets = TargetFeatures(extractor)
        with torch.no_grad():
            self.cond = model.get_learned_conditioning([""])   # once per run, shared by the batch

    def features(self, target: Target | str | torch.Tensor) -> torch.Tensor:
        return self.targets(target)

    def measure(self, images: torch.Tensor, goals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distance [B], cosine [B]) of images in [-1, 1] to goals [B, ...], whatever
        the run's loss (same channel subset)."""
        with torch.no_grad():
            return FeatureDistance(self.extractor, goals, channels=self.channels)(images.to(self.device))

    def decode_batch(self, goals: torch.Tensor, height: int, width: int, seeds: list[int],
                     **sampler_options) -> GuidedResult:
        """Decode a batch of target features [B, ...] at height x width. Target b uses a
        generator seeded with seeds[b], so its result does not depend on its batch mates.
        `sampler_options` go to `sample_feature_guided` (log, on_intermediate, progress, state,
        on_checkpoint, checkpoint_every, should_stop)."""
        factor = self.model.latent_downsample_factor
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"image size {height}x{width} must be positive multiples of {factor} "
                             "(the first stage's down-sampling factor)")
        objective = FeatureDistance(self.extractor, goals, loss=self.loss, channels=self.channels)
        shape = (goals.shape[0], self.model.channels, height // factor, width // factor)
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        options = {"log_cosine": getattr(self.extractor, "log_cosine", True), **sampler_options}
        if self.precision != "fp32":
            options["precision"] = self.precision
        return sample_feature_guided(self.model, self.cond, objective, self.settings, shape,
                                     generators, **options)


@dataclass
class Decoded:
    """One target's result. Images are [3, H, W] tensors in [0, 1] on the CPU."""

    target: Target | None
    features: torch.Tensor        # the target feature [1, ...]
    final: torch.Tensor
    best: torch.Tensor | None
    metrics: dict
    log: list[str] = field(default_factory=list)

    @staticmethod
    def to_pil(image: torch.Tensor) -> Image.Image:
        array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(array)


def decode(targets, extractor, *, settings: GuidanceSettings | None = None, model=None,
           config: str = DEFAULT_CONFIG, ckpt: str = DEFAULT_CKPT, preprocess=None,
           weights: str | None = None, spatial: bool = False, height: int = 512, width: int = 512,
           seed: int = 42, device=None, batch_size: int = 4, loss: str = "squared", channels=None,
           precision: str = "fp32", progress: bool = True) -> list[Decoded]:
    """Decode each target into images (see the module docstring); → one `Decoded` per target,
    in order. `settings` default to the paper's (`paper_settings()`); `model` is a loaded
    LatentDiffusion, else it is loaded from `config` and `ckpt`. Every target uses `seed`."""
    settings = settings or paper_settings()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(targets, (str, Target, torch.Tensor)):
        targets = [targets]
    items = [expand_targets([t])[0] if isinstance(t, str) else t for t in targets]
    extractor = as_extractor(extractor, preprocess=preprocess, weights=weights, spatial=spatial,
                             device=device)
    if model is None:
        model = load_model(config, ckpt, device)
    decoder = FeatureDecoder(model, extractor, settings, loss=loss, channels=channels, precision=precision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        goals = [decoder.features(item) for item in items]
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)

    results: list[Decoded] = []
    for start in range(0, len(items), batch_size):
        chunk = list(range(start, min(start + batch_size, len(items))))
        logs: list[list[str]] = [[] for _ in chunk]
        result = decoder.decode_batch(torch.cat([goals[i] for i in chunk]), height, width,
                                      [seed] * len(chunk), progress=progress,
                                      log=lambda b, line: logs[b].append(line))
        for b, i in enumerate(chunk):
            best: BestImage = result.best[b]
            images = [result.final_images[b]] + ([] if best.image is None else [best.image])
            distance, cosine = decoder.measure(torch.stack(images), goals[i])
            metrics = {
                "final": {"loss": float(result.final_distance[b]),
                          "squared_distance": float(distance[0]), "cosine": float(cosine[0])},
                "best": None if best.image is None else {
                    "t": best.t, "rec": best.rec, "loss": best.distance,
                    "squared_distance": float(distance[1]), "cosine": float(cosine[1])},
                "iterations": result.iterations,
            }
            item = items[i]
            results.append(Decoded(
                item if isinstance(item, Target) else None, goals[i].cpu(),
                ((result.final_images[b].float().cpu() + 1) / 2).clamp(0, 1),
                None if best.image is None else ((best.image + 1) / 2).clamp(0, 1),
                metrics, logs[b]))
    return results
