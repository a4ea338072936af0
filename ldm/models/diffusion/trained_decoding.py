"""Sampling a trained decoder (FeatInv, arXiv 2505.21032): a ControlLDM steered by the target's
feature as its hint, no extractor gradient.

`FeatInvDenoiser` is FeatInv's classifier-free guided noise as one denoiser, so that any sampler
of the denoiser protocol runs it:

- a text-conditioned base (SD, miniSD): guidance over the prompt, the hint in both branches,
  ε̂ = ε(z, c_u, h) + s (ε(z, c, h) − ε(z, c_u, h)), c the training prompt, c_u the empty one;
- an unconditional base (the toy LDM): guidance over the hint, the zero hint (what the hint
  dropout trains) being the unconditional branch, ε̂ = ε(z, 0) + s (ε(z, h) − ε(z, 0)).

`sample_featinv` is FeatInv's sampler (DDIM, η = 0, ldm/models/diffusion/ddim.py) with the
guided sampler's records: each step's x̂0 is decoded and scored ("estimate", self-recurrence 0),
the best is kept, the final image is scored ("final"); → a `GuidedResult`. The hybrid decoder is
the guided sampler (`sample_feature_guided`) with a `FeatInvDenoiser` as its model.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.controlled_ddpm import ControlLDM, HintConditioned, HintedDenoiser, ControlledDenoiser
from ldm.models.diffusion.ddim import guided_noise, make_ddim_timesteps, sample_ddim
from ldm.models.diffusion.device_checks import DeviceChecks
from ldm.models.diffusion.feature_guidance import GuidedResult, Scorer
from ldm.models.diffusion.sampler_state import BestImage
from ldm.scorelog import Score


def _batched(x: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    return x if x is None or x.shape[0] == batch else x.expand(batch, *x.shape[1:])


class FeatInvDenoiser(ControlledDenoiser):
    """A ControlLDM with a hint batch and FeatInv's guidance bound: `apply_model(z_t, t, cond)`
    is the guided noise ε̂ whatever `cond` (the guided sampler passes its empty-prompt context).
    `context`/`uncontext`: the prompt's and the empty prompt's contexts (None: an unconditional
    base, guided over the hint)."""

    def __init__(self, model: ControlLDM, hint: torch.Tensor, guidance_scale: float,
                 context: torch.Tensor | None = None, uncontext: torch.Tensor | None = None):
        super().__init__(model)
        self.hint, self.guidance_scale = hint, guidance_scale
        self.context, self.uncontext = context, uncontext

    def apply_model(self, z_t, t, cond):
        batch = z_t.shape[0]
        hint = _batched(self.hint, batch)
        if self.context is None:
            return guided_noise(HintConditioned(self.model), z_t, t, hint, torch.zeros_like(hint),
                                self.guidance_scale)
        return guided_noise(HintedDenoiser(self.model, hint), z_t, t, _batched(self.context, batch),
                            _batched(self.uncontext, batch), self.guidance_scale)


class FeatInvStopped(Exception):
    """`should_stop()` said stop; the message is the step done ("3 of 50"). FeatInv's sampling
    keeps no resume state: it is short."""


def sample_featinv(denoiser: FeatInvDenoiser, objective, shape: tuple[int, int, int, int],
                   generators: list[torch.Generator], *, steps: int = 50,
                   on_record: Callable | None = None, progress: bool = True,
                   should_stop: Callable[[], bool] | None = None) -> GuidedResult:
    """FeatInv's DDIM sampling of a batch (one generator per image, its initial noise), every
    step's x̂0 scored with `objective(images)` → (loss [B], cosine [B]); → the final images
    D(z_0), their scores and the best x̂0 per target. `iterations` counts the DDIM steps.
    `should_stop()` is polled after each step (FeatInvStopped)."""
    emit = on_record or (lambda record: None)
    best = [BestImage() for _ in range(shape[0])]
    scorer = Scorer(objective, best, emit, DeviceChecks())
    timesteps = make_ddim_timesteps(denoiser.num_timesteps, steps)
    bar = tqdm(total=len(timesteps), unit="step", desc="FeatInv DDIM", disable=not progress,
               dynamic_ncols=True)

    def score_estimate(step: dict) -> None:
        scorer.where = (step["t"], 0)
        scorer.checks.where = (step["t"], 0, None)   # a fault keeps no state: FeatInv has none
        scorer(denoiser.decode_first_stage(step["x0_hat"]), "estimate")
        bar.update()
        if should_stop is not None and should_stop():
            raise FeatInvStopped(f"{step['i'] + 1} of {len(timesteps)}")

    with torch.no_grad():
        try:
            z = sample_ddim(denoiser, shape, guidance_scale=1.0, steps=steps, generators=generators,
                            callback=score_estimate)
        finally:
            bar.close()
        final = denoiser.decode_first_stage(z)
        distance, cosine = objective(final)
    for b, (d, c) in enumerate(zip(distance.tolist(), cosine.tolist())):
        emit(Score(b, -1, None, "final", d, c))
    return GuidedResult(final, distance, cosine, best, len(timesteps), [0] * shape[0])
