"""The reverse process's schedule and its ancestral DDPM step, as the guided sampler walks it.

Notation (ldm conventions, as in the reference): timestep index i from T-1 down to 0, β_i =
`betas[i]`, ᾱ_i = `alphas_cumprod[i]`; `i_prev` is the next (less noisy) visited timestep, -1
after the last one.

- Visited timesteps: all T (the reference), or N of them evenly spaced from T-1 to 0
  (`--optim_timesteps`, a respaced schedule).
- Self-recurrences K at timestep i: `num_steps[0]` while i >= E (`early_emp_end`, the paper's
  early-step emphasis), the last value after.
- β of a step: β_i between consecutive timesteps; on a respaced schedule the variance of the
  jump, β' = 1 − ᾱ_i / ᾱ_{i_prev} (Nichol & Dhariwal, "Improved DDPM", 2021, eq. 19).
- Ancestral step (Ho et al., "DDPM", 2020, eq. 11, with variance β):
  z_{i_prev} = (z_i − β / √(1 − ᾱ_i) · ε(z_i, ẑ0)) / √(1 − β) + √β · n.
- DDIM step (Song et al., "DDIM", 2021, η = 0), an option of the fast path:
  z_{i_prev} = √ᾱ_{i_prev} ẑ0 + √(1 − ᾱ_{i_prev}) ε(z_i, ẑ0).
- Re-noising between self-recurrences (Bansal et al., "Universal Guidance", 2023):
  z_i ← √(1 − β) · z_{i_prev} + √β · n.
"""
from __future__ import annotations

import torch


def visited_timesteps(num_timesteps: int, count: int | None = None) -> list[int]:
    """The timesteps visited, noisiest first: all of them, or `count` evenly spaced from
    num_timesteps − 1 down to 0."""
    n = num_timesteps if count is None else min(count, num_timesteps)
    if n == num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    if n == 1:
        return [num_timesteps - 1]
    return sorted({round(k * (num_timesteps - 1) / (n - 1)) for k in range(n)}, reverse=True)


def recurrences(i: int, num_steps: tuple[int, ...], early_emp_end: int) -> int:
    """K at timestep i: the first value of num_steps early (i >= early_emp_end), else the last."""
    return num_steps[0] if i >= early_emp_end else num_steps[-1]


def step_beta(betas: torch.Tensor, alphas_cumprod: torch.Tensor, i: int, i_prev: int) -> torch.Tensor:
    """β of the step from timestep i to i_prev: β_i for consecutive timesteps (bit for bit the
    reference), 1 − ᾱ_i/ᾱ_{i_prev} on a respaced schedule (ᾱ_{-1} = 1)."""
    if i_prev == i - 1:
        return betas[i]
    abar = alphas_cumprod.double()
    abar_prev = abar[i_prev] if i_prev >= 0 else abar.new_tensor(1.0)
    return (1 - abar[i] / abar_prev).to(betas.dtype)


def ancestral_step(model, z: torch.Tensor, t: torch.Tensor, z0: torch.Tensor, beta: torch.Tensor,
                   i: int, noise: torch.Tensor) -> torch.Tensor:
    """z_{i_prev} from z_i and the estimate ẑ0 (its noise ε recovered by the DDPM relation)."""
    eps = model.predict_noise_from_start(z, t, z0)
    return (z - beta / (1 - model.alphas_cumprod[i]).sqrt() * eps) / (1 - beta).sqrt() + beta.sqrt() * noise


def ddim_step(model, z: torch.Tensor, t: torch.Tensor, z0: torch.Tensor, i_prev: int) -> torch.Tensor:
    """The deterministic DDIM step (Song et al., 2021, η = 0): z_{i_prev} = √ᾱ_{i_prev} ẑ0 +
    √(1 − ᾱ_{i_prev}) ε(z_i, ẑ0)."""
    eps = model.predict_noise_from_start(z, t, z0)
    abar_prev = model.alphas_cumprod[i_prev]
    return abar_prev.sqrt() * z0 + (1 - abar_prev).sqrt() * eps


def renoise(z_prev: torch.Tensor, beta: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Back from i_prev to timestep i for the next self-recurrence."""
    return (1 - beta).sqrt() * z_prev + beta.sqrt() * noise
