"""The Python entry point: decode target features into images, as the command line does.

    from ldm import decode, paper_settings

    results = decode(["data/examples/chelsea.jpg"], "torchvision:resnet50",
                     settings=paper_settings(clip=3.0), device="cuda", precision="bf16")
    results[0].final          # [3, H, W] in [0, 1]
    results[0].metrics        # squared distance and cosine of the final and the best image

`extractor` is a registry name (`ldm.extractors.build_extractor`: "torchvision:resnet50@layer3",
"open_clip:RN50", "timm:convnext_tiny", ...), a `FeatureExtractor`, or any `torch.nn.Module`
together with `preprocess` (a differentiable function of images in [0, 1], see
`ldm.extractors.ModuleExtractor`). Targets are the strings of `ldm.targets` (image paths, folders,
feature files, text prompts, feature arithmetic such as
`image("cat.jpg") + 0.5 * (text("a dog") - text("a cat"))`), `Target`s, or feature tensors.

`FeatureDecoder` is the layer below: a loaded model and extractor that turns targets into
features and decodes batches of them with the sampler's callbacks (the command line, ldm/cli,
adds files, resumption and signals on top of it). Settings default to the reference's flag
defaults, as on the command line (forward guidance off: unguided samples; `paper_settings()`
are the paper's).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field, replace

import torch
from PIL import Image
from torch import nn

from ldm.decoders import DecoderKind, DecoderOptions, make_decoding, sample_batch, to_unit_range
from ldm.extractors import FeatureExtractor, build_extractor
from ldm.models.diffusion.feature_guidance import GuidanceSettings, GuidedResult
from ldm.models.diffusion.mixed_precision import autocast_dtype
from ldm.models.loading import DEFAULT_CKPT, DEFAULT_CONFIG
from ldm.objectives import FeatureDistance, check_target
from ldm.scorelog import Score, format_line
from ldm.target_features import TargetFeatures, describe_target
from ldm.targets import Target, TargetError, expand_targets, read_image

def paper_settings(clip: float = 3.0, **changes) -> GuidanceSettings:
    """The settings of the paper's runs (README of the reference): forward guidance, w = 4,
    K = 1000 for the first 5 timesteps and 8 after (12,960 guided iterations), gradient clipping
    at `clip` (3.0 for CLIP RN50 and ResNet-50, 2.0 for ViT-H/14). `changes` override fields,
    e.g. `timesteps=100` for a respaced schedule."""
    base = GuidanceSettings(forward_guidance=True, forward_guidance_wt=4.0, grad_clip_threshold=clip,
                            num_steps=(1000, 8), early_emp_end=995)
    return replace(base, **changes)


def unguided_warning(settings: GuidanceSettings) -> str | None:
    if settings.forward_guidance or settings.backward_guidance:
        return None
    return ("forward guidance is off, so these are unguided samples of the diffusion model (the "
            "reference's flag defaults); turn it on with --optim_forward_guidance, or use the "
            "paper's settings: --paper / paper_settings()")


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


class FeatureDecoder:
    """A loaded latent diffusion model and extractor, with the settings of a run and its
    `decoding` (a kind of ldm.decoders, bound to the model: guided by default)."""

    def __init__(self, model, extractor: FeatureExtractor, settings: GuidanceSettings, *,
                 loss: str = "squared", channels=None, precision: str = "fp32", gradient_decoder=None,
                 decoding: DecoderKind | None = None):
        autocast_dtype(precision)   # ValueError for an unknown precision
        self.model, self.extractor, self.settings = model, extractor, settings
        self.gradient_decoder = gradient_decoder   # the fast path's tiny decoder, or None
        self.loss, self.channels, self.precision = loss, channels, precision
        self.decoding = decoding or make_decoding(DecoderOptions())
        self.device = model.betas.device
        self.targets = TargetFeatures(extractor)
        with torch.no_grad():
            self.cond = model.get_learned_conditioning([""])   # once per run, shared by the batch

    @property
    def total_iterations(self) -> int:
        """Denoising iterations of one decode (DDIM steps for FeatInv, guided iterations else)."""
        return self.decoding.iterations(self.model, self.settings)

    def features(self, target: Target | str | torch.Tensor) -> torch.Tensor:
        """The target's feature [1, ...]; TargetError if it is unusable (NaN/inf, or zero on
        the compared channels)."""
        goal = self.targets(target)
        try:
            check_target(goal, self.channels, model=self.extractor)
        except ValueError as err:
            raise TargetError(f"{describe_target(target)}: {err}") from None
        return goal

    def hint(self, target: Target | str | torch.Tensor, goal: torch.Tensor) -> torch.Tensor | None:
        """A trained decoder's hint for `target` (whose feature is `goal`); None for others."""
        return self.decoding.hint(target, goal)

    def measure(self, images: torch.Tensor, goals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distance [B], cosine [B]) of images in [-1, 1] to goals [B, ...], whatever
        the run's loss (same channel subset)."""
        with torch.no_grad():
            return FeatureDistance(self.extractor, goals, channels=self.channels)(images.to(self.device))

    def final_scores(self, result: GuidedResult, goals: torch.Tensor) -> list[dict]:
        """Each target's final image as {loss, squared_distance, cosine}: the sampler's numbers,
        the squared distance measured on the images (all at once) when the loss is another."""
        squared = (result.final_distance if self.loss == "squared"
                   else self.measure(result.final_images, goals)[0])
        return [{"loss": float(d), "squared_distance": float(s), "cosine": float(c)}
                for d, s, c in zip(result.final_distance, squared, result.final_cosine)]

    def best_scores(self, bests: list, goals: torch.Tensor) -> list[dict | None]:
        """Each target's best image (`BestImage`s) as {loss, squared_distance, cosine}, or None
        without one: the sampler's numbers, measured on the images themselves (all at once) when
        the loss is not the squared distance or a gradient decoder made the scored images."""
        scores = [None if b.image is None else {"loss": b.distance, "squared_distance": b.distance,
                                                "cosine": b.cosine} for b in bests]
        kept = [i for i, b in enumerate(bests) if b.image is not None]
        if kept and (self.loss != "squared" or self.gradient_decoder is not None):
            squared, cosine = self.measure(torch.stack([bests[i].image for i in kept]), goals[kept])
            for i, s, c in zip(kept, squared.tolist(), cosine.tolist()):
                scores[i] = {"loss": s if self.loss == "squared" else 1 - c, "squared_distance": s,
                             "cosine": c}
        return scores

    def measure_png(self, path, goal: torch.Tensor) -> dict:
        """What a reader of a saved figure measures: the PNG reloaded, preprocessed as targets."""
        with torch.no_grad():
            features = self.extractor.image_features(read_image(str(path)))
        distance, cosine = self.targets.compare(features, goal, self.channels)
        return {"squared_distance": float(distance[0]), "cosine": float(cosine[0])}

    def decode_batch(self, goals: torch.Tensor, height: int, width: int, seeds: list[int],
                     hints: torch.Tensor | None = None, **callbacks) -> GuidedResult:
        """Decode a batch of target features [B, ...] at height x width. Target b uses a
        generator seeded with seeds[b], so its result does not depend on its batch mates.
        `hints`: a trained decoder's hints [B, ...] (`hint`). `callbacks` go to the sampler
        (on_record, progress; the guided sampler's also on_intermediate, state, on_checkpoint,
        checkpoint_every, should_stop)."""
        factor = self.model.latent_downsample_factor
        multiple = self.model.image_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"image size {height}x{width} must be positive multiples of {multiple} "
                             "(the first stage's and the UNet's down-sampling)")
        objective = FeatureDistance(self.extractor, goals, loss=self.loss, channels=self.channels)
        shape = (goals.shape[0], self.model.channels, height // factor, width // factor)
        return sample_batch(self.decoding, self.model, objective, shape, seeds, settings=self.settings,
                            cond=self.cond, hints=hints, precision=self.precision,
                            gradient_decoder=self.gradient_decoder, **callbacks)


def load_decoder_models(decoding: DecoderKind, build_extractor, config: str, ckpt: str, device, *,
                        missing_hint: str | None = None):
    """The one model loader: the diffusion model first (a broken checkpoint fails before anything
    else is built), then the target model (`build_extractor(device)`), bound to the decoding;
    → (model, extractor)."""
    model = decoding.load_model(config, ckpt, device, missing_hint)
    extractor = build_extractor(device)
    decoding.bind(extractor, device)
    return model, extractor


@dataclass
class Decoded:
    """One target's result. Images are [3, H, W] tensors in [0, 1] on the CPU."""

    target: Target | None
    features: torch.Tensor        # the target feature [1, ...]
    final: torch.Tensor
    best: torch.Tensor | None
    metrics: dict
    scores: list[Score] = field(default_factory=list)

    @property
    def log(self) -> list[str]:
        """The scores as the reference's log lines."""
        return [format_line(score) for score in self.scores]

    @staticmethod
    def to_pil(image: torch.Tensor) -> Image.Image:
        array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(array)


def _targets(targets) -> list:
    """Target strings (folders expand to every image in them), Targets and tensors, in order."""
    if isinstance(targets, (str, Target, torch.Tensor)):
        targets = [targets]
    items = []
    for target in targets:
        items += expand_targets([target]) if isinstance(target, str) else [target]
    return items


def decode(targets, extractor, *, settings: GuidanceSettings | None = None, model=None,
           config: str = DEFAULT_CONFIG, ckpt: str = DEFAULT_CKPT, preprocess=None,
           weights: str | None = None, spatial: bool = False, height: int = 512, width: int = 512,
           seed: int = 42, device=None, batch_size: int = 4, loss: str = "squared", channels=None,
           precision: str = "fp32", progress: bool = True, decoder: str = "guided",
           featinv_decoder: str | None = None, featinv_steps: int = 50,
           featinv_guidance: float = 1.75) -> list[Decoded]:
    """Decode each target into images (see the module docstring); → one `Decoded` per target,
    in order (a folder gives one per image in it). `settings` default to the reference's flag
    defaults (`GuidanceSettings()`, unguided: pass `paper_settings()` for the paper's); `model`
    is a loaded LatentDiffusion, else it is loaded from `config` and `ckpt`. Every target uses
    `seed`. `decoder`: "guided", or "featinv"/"hybrid" with the trained decoder file
    `featinv_decoder` on the base model `config`/`ckpt` (`model` is then not used)."""
    settings = settings or GuidanceSettings()
    decoding = make_decoding(DecoderOptions(decoder, featinv_decoder, featinv_steps, featinv_guidance, weights))
    if decoding.guided and unguided_warning(settings):
        warnings.warn(unguided_warning(settings), stacklevel=2)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    items = _targets(targets)
    build = lambda device: as_extractor(extractor, preprocess=preprocess, weights=weights,  # noqa: E731
                                        spatial=spatial, device=device)
    if model is None or decoding.needs_file:
        model, extractor = load_decoder_models(decoding, build, config, ckpt, device)
    else:
        extractor = build(device)
    decoder = FeatureDecoder(model, extractor, settings, loss=loss, channels=channels, precision=precision,
                             decoding=decoding)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        goals = [decoder.features(item) for item in items]
        hints = [decoder.hint(item, goal) for item, goal in zip(items, goals)]
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    results: list[Decoded] = []
    for start in range(0, len(items), batch_size):
        chunk = list(range(start, min(start + batch_size, len(items))))
        results += _decode_chunk(decoder, [items[i] for i in chunk], [goals[i] for i in chunk],
                                 None if hints[0] is None else torch.cat([hints[i] for i in chunk]),
                                 height, width, seed, progress)
    return results


def _decode_chunk(decoder: FeatureDecoder, items, goals, hints, height, width, seed, progress) -> list[Decoded]:
    scores: list[list[Score]] = [[] for _ in items]
    result = decoder.decode_batch(torch.cat(goals), height, width, [seed] * len(items), hints=hints,
                                  progress=progress,
                                  on_record=lambda r: scores[r.image].append(r) if isinstance(r, Score) else None)
    finals, bests = decoder.final_scores(result, torch.cat(goals)), decoder.best_scores(result.best, torch.cat(goals))
    out = []
    for b, (item, goal) in enumerate(zip(items, goals)):
        best = result.best[b]
        metrics = {
            "final": finals[b],
            "best": None if best.image is None else {
                "t": best.timestep, "recurrence": best.recurrence, "stage": best.stage, **bests[b]},
            "iterations": result.iterations,
        }
        out.append(Decoded(item if isinstance(item, Target) else None, goal.cpu(),
                           to_unit_range(result.final_images[b].float().cpu()),
                           None if best.image is None else to_unit_range(best.image),
                           metrics, scores[b]))
    return out
