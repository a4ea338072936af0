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

from ldm.extractors import FeatureExtractor, build_extractor
from ldm.models.diffusion.feature_guidance import GuidanceSettings, GuidedResult, sample_feature_guided
from ldm.models.diffusion.ddim import make_ddim_timesteps
from ldm.models.diffusion.mixed_precision import MixedPrecision, autocast_dtype
from ldm.models.diffusion.trained_decoding import FeatInvDenoiser, sample_featinv
from ldm.models.loading import DEFAULT_CKPT, DEFAULT_CONFIG, load_model
from ldm.objectives import (FeatureDistance, check_target, cosine_similarity, parse_channels,
                            squared_distance)
from ldm.scorelog import Score, format_line
from ldm.targets import Target, TargetError, expand_targets, load_feature_file, read_image, target_features


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
            self._feature_shape = self.extractor.feature_shape()
        return self._feature_shape

    def _leaf(self, kind: str, source: str) -> torch.Tensor:
        if kind == "image":
            return self.extractor.image_features(read_image(source))
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


def _network(spec: str) -> tuple[str, str] | str:
    """(library, model) of a registry spec; the spec itself when it is not one (a fixed class)."""
    from ldm.extractors import parse_spec

    try:
        parsed = parse_spec(spec)
    except ValueError:
        return spec
    return parsed.library, parsed.model


def check_trained_decoder(record, extractor_name: str, path) -> None:
    """ValueError unless the decoder `record` (of the file `path`) decodes a feature of the run's
    target model (the same network; the layer may differ: the hint is read at the decoder's)."""
    if _network(record.extractor) != _network(extractor_name):
        raise ValueError(f"the trained decoder {path} decodes features of {record.extractor_spec}, "
                         f"not of this run's target model {extractor_name}: give the decoder trained "
                         "for this model (scripts/train_featinv.py --extractor ...)")


def trained_decoding(kind: str, record, path, extractor: FeatureExtractor, *, device, steps: int = 50,
                     guidance_scale: float = 1.75) -> TrainedDecoding:
    """How the decoder `record` (of the file `path`) decodes for `extractor` (ValueError if it
    decodes another network's features)."""
    check_trained_decoder(record, extractor.name, path)
    # The same network: the run's own feature is the hint when the layer and the readout are the
    # decoder's too.
    own = record.layer == extractor.layer and record.spatial == extractor.spatial
    hint_extractor = None if own else record.build_extractor(device)
    return TrainedDecoding(kind, record, hint_extractor, steps, guidance_scale)


def _describe(target) -> str:
    if isinstance(target, Target):
        return f"{target.kind} target {target.source!r}"
    return "the target tensor" if isinstance(target, torch.Tensor) else f"target {target!r}"


@dataclass
class TrainedDecoding:
    """How a trained FeatInv decoder decodes (docs/trained-decoder.md): `kind` "featinv" (its DDIM
    sampler, `steps` steps) or "hybrid" (the guided sampler with it as the denoiser), with
    classifier-free guidance `guidance_scale`. `record`: the decoder's (ldm.featinv); `hint_extractor`:
    the extractor its hints come from, when it is not the run's (e.g. a spatial layer of the
    network whose pooled feature is the target)."""

    kind: str
    record: object
    hint_extractor: FeatureExtractor | None = None
    steps: int = 50
    guidance_scale: float = 1.75

    def to_json(self) -> dict:
        return {"kind": self.kind, "extractor": self.record.extractor_spec, "spatial": self.record.spatial,
                "steps": self.steps if self.kind == "featinv" else None,
                "guidance_scale": self.guidance_scale}


class FeatureDecoder:
    """A loaded latent diffusion model and extractor, with the settings of a run. With `trained`,
    `model` is the decoder's ControlLDM (its base model inside) and decoding is FeatInv's or the
    hybrid's."""

    def __init__(self, model, extractor: FeatureExtractor, settings: GuidanceSettings, *,
                 loss: str = "squared", channels=None, precision: str = "fp32", gradient_decoder=None,
                 trained: TrainedDecoding | None = None):
        autocast_dtype(precision)   # ValueError for an unknown precision
        self.model, self.extractor, self.settings = model, extractor, settings
        self.gradient_decoder = gradient_decoder   # the fast path's tiny decoder, or None
        self.loss, self.channels, self.precision = loss, channels, precision
        self.trained = trained
        self.device = model.betas.device
        self.targets = TargetFeatures(extractor)
        self.hint_targets = (TargetFeatures(trained.hint_extractor)
                             if trained is not None and trained.hint_extractor is not None else None)
        with torch.no_grad():
            self.cond = model.get_learned_conditioning([""])   # once per run, shared by the batch
            prompt = trained.record.prompt if trained is not None else None
            self.context = model.get_learned_conditioning([prompt]) if prompt else None

    @property
    def kind(self) -> str:
        return self.trained.kind if self.trained else "guided"

    @property
    def total_iterations(self) -> int:
        """Denoising iterations of one decode: DDIM steps for FeatInv, guided iterations else."""
        if self.kind == "featinv":
            return len(make_ddim_timesteps(self.model.num_timesteps, self.trained.steps))
        return self.settings.total_iterations(self.model.num_timesteps)

    def hint(self, target: Target | str | torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """The trained decoder's hint for `target` (whose feature is `goal`): the goal itself, or
        the target read by the decoder's own extractor."""
        from ldm.featinv import feature_to_hint

        if self.hint_targets is None:
            return feature_to_hint(goal)
        if isinstance(target, torch.Tensor) or (not isinstance(target, str) and any(
                kind == "features" for kind, _ in target.leaves())):
            raise TargetError(f"{_describe(target)}: the trained decoder reads its hint with "
                              f"{self.trained.record.extractor_spec}, which a feature target cannot "
                              "give; use an image (or text) target")
        return feature_to_hint(self.hint_targets(target))

    def features(self, target: Target | str | torch.Tensor) -> torch.Tensor:
        """The target's feature [1, ...]; TargetError if it is unusable (NaN/inf, or zero on
        the compared channels)."""
        goal = self.targets(target)
        try:
            check_target(goal, self.channels, model=self.extractor)
        except ValueError as err:
            raise TargetError(f"{_describe(target)}: {err}") from None
        return goal

    def measure(self, images: torch.Tensor, goals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distance [B], cosine [B]) of images in [-1, 1] to goals [B, ...], whatever
        the run's loss (same channel subset)."""
        with torch.no_grad():
            return FeatureDistance(self.extractor, goals, channels=self.channels)(images.to(self.device))

    def measure_png(self, path, goal: torch.Tensor) -> dict:
        """What a reader of a saved figure measures: the PNG reloaded, preprocessed as targets."""
        with torch.no_grad():
            features = self.extractor.image_features(read_image(str(path)))
        distance, cosine = self.targets.compare(features, goal, self.channels)
        return {"squared_distance": float(distance[0]), "cosine": float(cosine[0])}

    def decode_batch(self, goals: torch.Tensor, height: int, width: int, seeds: list[int],
                     hints: torch.Tensor | None = None, **sampler_options) -> GuidedResult:
        """Decode a batch of target features [B, ...] at height x width. Target b uses a
        generator seeded with seeds[b], so its result does not depend on its batch mates.
        `hints`: the trained decoder's hints [B, ...] (`hint`; default: from the goals).
        `sampler_options` go to `sample_feature_guided` (on_record, on_intermediate, progress,
        state, on_checkpoint, checkpoint_every, should_stop); FeatInv's sampler takes on_record
        and progress only (it is short: no resume states)."""
        factor = self.model.latent_downsample_factor
        multiple = self.model.image_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"image size {height}x{width} must be positive multiples of {multiple} "
                             "(the first stage's and the UNet's down-sampling)")
        objective = FeatureDistance(self.extractor, goals, loss=self.loss, channels=self.channels)
        shape = (goals.shape[0], self.model.channels, height // factor, width // factor)
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        model = self.model
        if self.trained is not None:
            from ldm.featinv import feature_to_hint

            model = FeatInvDenoiser(self.model, feature_to_hint(goals) if hints is None else hints,
                                    self.trained.guidance_scale, self.context, self.cond)
            if self.kind == "featinv":
                if autocast_dtype(self.precision) is not None:
                    model = MixedPrecision(model, objective, self.precision, self.device)
                    objective = model.objective
                return sample_featinv(model, objective, shape, generators, steps=self.trained.steps,
                                      on_record=sampler_options.get("on_record"),
                                      progress=sampler_options.get("progress", True),
                                      should_stop=sampler_options.get("should_stop"))
        return sample_feature_guided(model, self.cond, objective, self.settings, shape,
                                     generators, precision=self.precision,
                                     gradient_decoder=self.gradient_decoder, **sampler_options)


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
    if decoder not in ("guided", "featinv", "hybrid"):
        raise ValueError(f"decoder must be guided, featinv or hybrid, not {decoder!r}")
    if decoder != "guided" and not featinv_decoder:
        raise ValueError(f"decoder {decoder!r} needs featinv_decoder, a trained decoder file")
    if decoder != "featinv" and unguided_warning(settings):
        warnings.warn(unguided_warning(settings), stacklevel=2)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    items = _targets(targets)
    extractor = as_extractor(extractor, preprocess=preprocess, weights=weights, spatial=spatial,
                             device=device)
    trained = None
    if decoder != "guided":
        from ldm.featinv import load_decoder

        model, record = load_decoder(featinv_decoder, ckpt, base_config=config, device=device)
        trained = trained_decoding(decoder, record, featinv_decoder, extractor, device=device,
                                   steps=featinv_steps, guidance_scale=featinv_guidance)
    elif model is None:
        model = load_model(config, ckpt, device)
    decoder = FeatureDecoder(model, extractor, settings, loss=loss, channels=channels, precision=precision,
                             trained=trained)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        goals = [decoder.features(item) for item in items]
        hints = [decoder.hint(item, goal) for item, goal in zip(items, goals)] if trained else None
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    results: list[Decoded] = []
    for start in range(0, len(items), batch_size):
        chunk = list(range(start, min(start + batch_size, len(items))))
        results += _decode_chunk(decoder, [items[i] for i in chunk], [goals[i] for i in chunk],
                                 None if hints is None else torch.cat([hints[i] for i in chunk]),
                                 height, width, seed, progress)
    return results


def _decode_chunk(decoder: FeatureDecoder, items, goals, hints, height, width, seed, progress) -> list[Decoded]:
    scores: list[list[Score]] = [[] for _ in items]
    result = decoder.decode_batch(torch.cat(goals), height, width, [seed] * len(items), hints=hints,
                                  progress=progress,
                                  on_record=lambda r: scores[r.image].append(r) if isinstance(r, Score) else None)
    out = []
    for b, (item, goal) in enumerate(zip(items, goals)):
        best = result.best[b]
        images = [result.final_images[b]] + ([] if best.image is None else [best.image])
        distance, cosine = decoder.measure(torch.stack(images), goal)
        metrics = {
            "final": {"loss": float(result.final_distance[b]),
                      "squared_distance": float(distance[0]), "cosine": float(cosine[0])},
            "best": None if best.image is None else {
                "t": best.timestep, "recurrence": best.recurrence, "stage": best.stage,
                "loss": best.distance, "squared_distance": float(distance[1]), "cosine": float(cosine[1])},
            "iterations": result.iterations,
        }
        out.append(Decoded(item if isinstance(item, Target) else None, goal.cpu(),
                           ((result.final_images[b].float().cpu() + 1) / 2).clamp(0, 1),
                           None if best.image is None else ((best.image + 1) / 2).clamp(0, 1),
                           metrics, scores[b]))
    return out
