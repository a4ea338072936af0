"""The trained decoders (docs/trained-decoder.md): FeatInv's ControlNet on a frozen latent
diffusion model, sampled by its own DDIM (`featinv`) or as the guided sampler's denoiser
(`hybrid`). Both read the decoder file's record before anything loads, and steer the base
model of --config/--ckpt."""
from __future__ import annotations

from pathlib import Path

import torch

from ldm.decoders.base import DecoderKind, Sampling
from ldm.files import not_a_file
from ldm.models.diffusion.ddim import make_ddim_timesteps
from ldm.models.diffusion.feature_guidance import sample_feature_guided
from ldm.models.diffusion.mixed_precision import MixedPrecision, autocast_dtype
from ldm.models.diffusion.trained_decoding import FeatInvDenoiser, sample_featinv
from ldm.target_features import TargetFeatures, describe_target
from ldm.targets import TargetError


def _network(spec: str) -> tuple[str, str] | str:
    """(library, model) of a registry spec; the spec itself when it is not one (a fixed class)."""
    from ldm.extractors import parse_spec

    try:
        parsed = parse_spec(spec)
    except ValueError:
        return spec
    return parsed.library, parsed.model


class Trained(DecoderKind):
    """A FeatInv decoder file steering its base model; the hint is the target's feature at the
    decoder's layer (the run's own feature when the layer and readout are the decoder's)."""

    needs_file = True
    record = None
    hint_extractor = None     # the extractor the hints come from, when it is not the run's
    context = None            # the training prompt's context (None: guided over the hint)

    def check(self, extractor_name: str) -> None:
        from ldm.featinv import read_record

        path = self.options.file
        if not_a_file(path):
            raise FileNotFoundError(f"{path!r}: {not_a_file(path)} (train one with scripts/train_featinv.py; "
                                    "the toy's ship in models/toy/featinv_*.safetensors)")
        self._check_network(read_record(path), extractor_name)

    def _check_network(self, record, extractor_name: str) -> None:
        if _network(record.extractor) != _network(extractor_name):
            raise ValueError(f"the trained decoder {self.options.file} decodes features of "
                             f"{record.extractor_spec}, not of this run's target model {extractor_name}: "
                             "give the decoder trained for this model (scripts/train_featinv.py --extractor ...)")

    def load_model(self, config, ckpt, device, missing_hint=None):
        from ldm.featinv import load_decoder

        model, self.record = load_decoder(self.options.file, ckpt, base_config=config, device=device)
        if self.record.prompt:
            with torch.no_grad():
                self.context = model.get_learned_conditioning([self.record.prompt])
        return model

    def bind(self, extractor, device) -> None:
        self._check_network(self.record, extractor.name)
        own = self.record.layer == extractor.layer and self.record.spatial == extractor.spatial
        self.hint_extractor = None if own else self.record.build_extractor(device, self.options.extractor_weights)

    def hint(self, target, goal: torch.Tensor) -> torch.Tensor:
        """The hint for `target`: its feature `goal`, or the target read by the decoder's own
        extractor (which a feature target cannot give)."""
        from ldm.featinv import feature_to_hint

        if self.hint_extractor is None:
            return feature_to_hint(goal)
        if isinstance(target, torch.Tensor) or (not isinstance(target, str) and any(
                kind == "features" for kind, _ in target.leaves())):
            raise TargetError(f"{describe_target(target)}: the trained decoder reads its hint with "
                              f"{self.record.extractor_spec}, which a feature target cannot give; "
                              "use an image (or text) target")
        return feature_to_hint(TargetFeatures(self.hint_extractor)(target))

    def image_hints(self, images: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
        from ldm.featinv import feature_to_hint

        if self.hint_extractor is None:
            return feature_to_hint(goals)
        with torch.no_grad():
            return feature_to_hint(self.hint_extractor(images))

    def denoiser(self, model, sampling: Sampling) -> FeatInvDenoiser:
        hints = sampling.hints
        if hints is None:
            raise ValueError("a trained decoder samples with hints: pass Sampling(hints=...)")
        return FeatInvDenoiser(model, hints, self.options.guidance, self.context, sampling.cond)

    def describe(self) -> dict:
        return {"kind": self.name, "extractor": self.record.extractor_spec, "spatial": self.record.spatial,
                "steps": None, "guidance_scale": self.options.guidance, "file": self.options.file}

    def fingerprinted(self) -> dict:
        return {"decoder": self.name, "featinv_decoder": Path(self.options.file),
                "featinv_guidance": self.options.guidance}


class FeatInv(Trained):
    """FeatInv's DDIM sampler: `steps` steps, no extractor gradient."""

    name = "featinv"
    guided = False

    def iterations(self, model, settings) -> int:
        return len(make_ddim_timesteps(model.num_timesteps, self.options.steps))

    def sample(self, model, objective, sampling: Sampling):
        denoiser = self.denoiser(model, sampling)
        if autocast_dtype(sampling.precision) is not None:
            denoiser = MixedPrecision(denoiser, objective, sampling.precision, model.betas.device)
            objective = denoiser.objective
        return sample_featinv(denoiser, objective, sampling.shape, sampling.generators,
                              steps=self.options.steps, on_record=sampling.callbacks.get("on_record"),
                              progress=sampling.callbacks.get("progress", True),
                              should_stop=sampling.callbacks.get("should_stop"))

    def describe(self) -> dict:
        return {**super().describe(), "steps": self.options.steps}

    def fingerprinted(self) -> dict:
        return {**super().fingerprinted(), "featinv_steps": self.options.steps}

    def label(self, settings) -> str:
        return "FeatInv DDIM"


class Hybrid(Trained):
    """The guided sampler with the trained decoder as its denoiser (the hybrid preset's schedule
    when no --preset is given)."""

    name = "hybrid"
    default_preset = "hybrid"

    def iterations(self, model, settings) -> int:
        return settings.total_iterations(model.num_timesteps)

    def sample(self, model, objective, sampling: Sampling):
        return sample_feature_guided(self.denoiser(model, sampling), sampling.cond, objective,
                                     sampling.settings, sampling.shape, sampling.generators,
                                     precision=sampling.precision,
                                     gradient_decoder=sampling.gradient_decoder, **sampling.callbacks)

    def label(self, settings) -> str:
        return f"hybrid {super().label(settings)}"
