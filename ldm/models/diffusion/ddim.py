"""DDIM sampling (Song, Meng and Ermon, "Denoising Diffusion Implicit Models", ICLR 2021) with
classifier-free guidance (Ho and Salimans, "Classifier-Free Diffusion Guidance", 2022), as
CompVis' `DDIMSampler` runs it and FeatInv samples with it (50 steps, eta 0, guidance 1.75).

The model is anything with the LatentDiffusion denoiser protocol (`apply_model(z, t, cond)`,
`predict_start_from_noise`, `alphas_cumprod`, `num_timesteps`), e.g. a LatentDiffusion or a
ControlLDM with its hint bound (`ldm.models.diffusion.controlled_ddpm.HintedDenoiser`).

One step from τ_i to τ_{i-1}, with ᾱ = alphas_cumprod, a = ᾱ[τ_i], a' = ᾱ[τ_{i-1}]:

    ε̂ = ε(z, τ_i, c_u) + s · (ε(z, τ_i, c) − ε(z, τ_i, c_u))        (guidance scale s)
    ẑ0 = (z − √(1 − a) ε̂) / √a                                       (Song et al., eq. 9)
    σ = η √((1 − a') / (1 − a)) √(1 − a / a')                        (eq. 16)
    z ← √a' ẑ0 + √(1 − a' − σ²) ε̂ + σ n,  n ~ N(0, I)                 (eq. 12)

η = 0 makes the whole trajectory a deterministic function of the initial noise.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ldm.models.diffusion.controlled_ddpm import HintedDenoiser


def make_ddim_timesteps(num_ddpm_timesteps: int, steps: int) -> list[int]:
    """CompVis' `make_ddim_timesteps(..., "uniform")`, ascending: every c-th timestep with
    c = T // steps, shifted by one (1, 1 + c, 1 + 2c, ...; for T = 1000, 50 steps: 1 ... 981).
    As there, a `steps` that does not divide T gives ceil(T / c) timesteps; where CompVis' last
    one would be T itself, past the schedule (e.g. 3 steps of 1000), it is left out."""
    if not 1 <= steps <= num_ddpm_timesteps:
        raise ValueError(f"DDIM steps must be in 1..{num_ddpm_timesteps}, got {steps}")
    return [k + 1 for k in range(0, num_ddpm_timesteps - 1, num_ddpm_timesteps // steps)]


def ddim_alphas(alphas_cumprod: torch.Tensor, timesteps: list[int]):
    """(a, a') per DDIM timestep: ᾱ[τ_i] and ᾱ[τ_{i-1}], with ᾱ[0] before the first (CompVis'
    `make_ddim_sampling_parameters`)."""
    a = alphas_cumprod[timesteps]
    a_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    return a, a_prev


def guided_noise(model, z, t, cond, uncond, guidance_scale: float) -> torch.Tensor:
    """ε̂ = ε(c_u) + s (ε(c) − ε(c_u)); one model call when s = 1."""
    if guidance_scale == 1:
        return model.apply_model(z, t, cond)
    if uncond is None:
        raise ValueError(f"guidance_scale {guidance_scale} needs an unconditional condition")
    eps_uncond = model.apply_model(z, t, uncond)
    eps_cond = model.apply_model(z, t, cond)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def _per_image_noise(shape, generators: Sequence[torch.Generator], device) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device)
                        for g in generators])


def _batched(cond, batch: int):
    if cond is None or cond.shape[0] == batch:
        return cond
    return cond.expand(batch, *cond.shape[1:])


@torch.no_grad()
def sample_ddim(model, shape: Sequence[int], cond=None, uncond=None, hint=None, *,
                steps: int = 50, eta: float = 0.0, guidance_scale: float = 1.75,
                generators: Sequence[torch.Generator],
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Latents [B, C, H, W] of `shape` sampled by DDIM; decode them with
    `model.decode_first_stage`.

    `cond`, `uncond`: the conditional and unconditional conditions (contexts; batch 1 or B;
    None for an unconditional model). `hint`: with a ControlLDM, the hint batch, bound to both
    branches (FeatInv); None: `model` is used as it is. `generators`: one per image, for its
    initial noise (and its noise at η > 0), so that an image does not depend on its batch
    mates. `callback` receives {x, i, t, x0_hat} after every step i (x: the new latent,
    x0_hat: ẑ0 of that step, t: the step's timestep).
    """
    if hint is not None:
        model = HintedDenoiser(model, hint)
    batch = shape[0]
    if len(generators) != batch:
        raise ValueError(f"need one generator per image: {len(generators)} for a batch of {batch}")
    device = model.alphas_cumprod.device
    cond, uncond = _batched(cond, batch), _batched(uncond, batch)
    timesteps = make_ddim_timesteps(model.num_timesteps, steps)
    alphas, alphas_prev = ddim_alphas(model.alphas_cumprod, timesteps)
    z = _per_image_noise(shape, generators, device)
    for i in reversed(range(len(timesteps))):
        t = torch.full((batch,), timesteps[i], device=device, dtype=torch.long)
        eps = guided_noise(model, z, t, cond, uncond, guidance_scale)
        z0 = model.predict_start_from_noise(z, t, eps)
        a_prev = alphas_prev[i]
        sigma = eta * ((1 - a_prev) / (1 - alphas[i]) * (1 - alphas[i] / a_prev)).sqrt()
        z = a_prev.sqrt() * z0 + (1 - a_prev - sigma ** 2).sqrt() * eps
        if eta > 0:
            z = z + sigma * _per_image_noise(shape, generators, device)
        if callback is not None:
            callback({"x": z, "i": len(timesteps) - 1 - i, "t": timesteps[i], "x0_hat": z0})
    return z
