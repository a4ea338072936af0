"""The paper's decoder: Stable Diffusion's reverse process guided by the feature distance's
gradient (ldm/models/diffusion/feature_guidance.py)."""
from __future__ import annotations

from ldm.decoders.base import DecoderKind, Sampling
from ldm.models.diffusion.feature_guidance import sample_feature_guided
from ldm.models.loading import load_model


class Guided(DecoderKind):
    name = "guided"

    def load_model(self, config, ckpt, device, missing_hint=None):
        kwargs = {"missing_hint": missing_hint} if missing_hint else {}
        return load_model(config, ckpt, device, **kwargs)

    def iterations(self, model, settings) -> int:
        return settings.total_iterations(model.num_timesteps)

    def sample(self, model, objective, sampling: Sampling):
        return sample_feature_guided(model, sampling.cond, objective, sampling.settings, sampling.shape,
                                     sampling.generators, precision=sampling.precision,
                                     gradient_decoder=sampling.gradient_decoder, **sampling.callbacks)
