"""The steps of feature guidance, each a short function over a latent diffusion model (after
Bansal et al., "Universal Guidance for Diffusion Models", 2023, as Shirahama et al. use it).

Notation: ε = UNet(z_i), ẑ0 = (z_i − √(1 − ᾱ_i) ε) / √ᾱ_i, D the first-stage decoder, f the
extractor, f_s the target, s = −‖f(D(ẑ0)) − f_s‖² (the objective's loss, negated).

- Forward guidance: g = ∂s/∂z_i (through UNet, ẑ0, D and f), rescaled per image to ‖ε‖
  (Frobenius norms), clipped to mean ± thr·std of its image; ε′ = ε − w·g, ẑ0′ = ẑ0(z_i, ε′).
- Backward guidance: Adam on ẑ0 to lower the distance of D(ẑ0) (only for images whose
  moving-average gate is open; below the cutoff a step is undone).
- z_prev selection: score each candidate z_{i_prev} by its own estimate at i_prev and keep the
  best per image over the self-recurrences of a timestep.

`score(images, stage, ...)` is the sampler's scorer: it evaluates the objective, reports the
scores and keeps the best images; the steps only decide what is scored.
"""
from __future__ import annotations

import math

import torch

from ldm.models.diffusion.mixed_precision import guidance_loss


def per_image(x: torch.Tensor) -> torch.Tensor:
    """Per-image scalars [B] shaped to broadcast over latents [B, C, H, W]."""
    return x.reshape(-1, *([1] * 3))


def rescale_to_noise_norm(grad: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad · ‖eps‖/‖grad‖ per image (Frobenius norms). Images whose gradient is zero or not
    finite get a zero gradient instead of NaN; the returned mask marks them."""
    grad_norm = grad.flatten(1).norm(dim=1)
    eps_norm = eps.flatten(1).norm(dim=1)
    bad = ~torch.isfinite(grad_norm) | (grad_norm == 0)
    scale = torch.where(bad, torch.zeros_like(grad_norm), eps_norm / torch.where(bad, 1.0, grad_norm))
    grad = torch.where(per_image(bad), torch.zeros_like(grad), grad)
    return grad * per_image(scale), bad


def clip_to_std(grad: torch.Tensor, threshold: float) -> torch.Tensor:
    """Clamp each element to mean ± threshold·std of its image's gradient (unbiased std)."""
    if threshold <= 0:
        return grad
    flat = grad.flatten(1)
    mean, std = flat.mean(dim=1), flat.std(dim=1)
    low, high = per_image(mean - threshold * std), per_image(mean + threshold * std)
    return torch.minimum(torch.maximum(grad, low), high)


def estimate_with_gradient(model, z, t, cond, score, precision: str, checks, *, decode=None,
                           through_unet: bool = True, keep_latents: bool = False):
    """ε, ẑ0, D(ẑ0), its distance and the unnormalised guidance gradient g.

    - `through_unet` (the reference): g = ∂s/∂z_i, through the UNet, ẑ0, D and f.
    - Without the UNet's Jacobian: g = ∂s/∂ẑ0 (ε held fixed, ∂ẑ0/∂z_i = I/√ᾱ_i, a positive scale
      that the rescaling to ‖ε‖ removes), as manifold-preserving guidance takes it (He et al.,
      ICLR 2024): one UNet forward pass, no backward through it.
    - `decode`: the decoder the gradient flows through (the first stage's by default, or a cheap
      one: ldm/models/taesd.py); `keep_latents`: the scores carry ẑ0 so that best images can be
      rendered by the full decoder later."""
    decode = decode or model.decode_first_stage
    if through_unet:
        z_in = z.detach().requires_grad_(True)
        with torch.enable_grad():
            eps = model.apply_model(z_in, t, cond)
            checks.check(eps.detach(), "noise prediction (UNet output)")
            z0 = model.predict_start_from_noise(z_in, t, eps)
            x = decode(z0)
            dist, _ = score(x, "estimate", grad=True, latents=z0 if keep_latents else None)
            (grad,) = torch.autograd.grad(guidance_loss(dist, precision), z_in)
    else:
        with torch.no_grad():
            eps = model.apply_model(z, t, cond)
            checks.check(eps, "noise prediction (UNet output)")
            z0 = model.predict_start_from_noise(z, t, eps).requires_grad_(True)
        with torch.enable_grad():
            x = decode(z0)
            dist, _ = score(x, "estimate", grad=True, latents=z0 if keep_latents else None)
            (grad,) = torch.autograd.grad(guidance_loss(dist, precision), z0)
    checks.check(grad, "guidance gradient")
    return eps.detach(), z0.detach(), x.detach(), dist.detach(), grad


def guided_estimate(model, z, t, eps, grad, weight: float, threshold: float, checks, on_unguided):
    """ẑ0′ = ẑ0(z_i, ε − w·g′) with g′ the rescaled, clipped gradient. `on_unguided(mask)` gets
    the images whose gradient was zero (they went unguided)."""
    grad, unguided = rescale_to_noise_norm(grad, eps)
    checks.on_host(on_unguided, unguided)
    grad = clip_to_std(grad, threshold)
    with torch.no_grad():
        z0 = model.predict_start_from_noise(z, t, eps - weight * grad)
        checks.check(z0, "guided latent estimate z0")
        return z0


def plain_estimate(model, z, t, cond, checks, decode: bool = True):
    """ẑ0 and D(ẑ0) without guidance (ẑ0 alone if not `decode`)."""
    with torch.no_grad():
        eps = model.apply_model(z, t, cond)
        checks.check(eps, "noise prediction (UNet output)")
        z0 = model.predict_start_from_noise(z, t, eps)
        return (z0, model.decode_first_stage(z0)) if decode else z0


def backward_guidance(model, score, z0, active, settings):
    """Adam on ẑ0 (the reference's "guidance_2") for the images whose gate is `active`;
    → (ẑ0, D(ẑ0)). Each iteration is scored as "backward_iteration", the result as "backward"."""
    z0 = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z0], lr=settings.lr)
    keep = per_image(active)
    for k in range(settings.max_iters):
        with torch.enable_grad():
            dist, _ = score(model.decode_first_stage(z0), "backward_iteration", bk=k, grad=True)
            old = z0.detach().clone()
            opt.zero_grad(set_to_none=True)
            dist.sum().backward()
        opt.step()
        with torch.no_grad():
            # Images outside the gate keep their ẑ0; below the cutoff the step is undone.
            stop = dist.detach() < settings.loss_cutoff
            z0.copy_(torch.where(keep & ~per_image(stop), z0, old))
        if bool(stop[active].all()):
            break
    z0 = z0.detach()
    with torch.no_grad():
        x = model.decode_first_stage(z0)
    score(x, "backward", bk=settings.max_iters)
    return z0, x


def prev_candidate_scores(model, objective, z_prev, t_prev, cond, checks):
    """(distance, cosine) of a z_prev candidate: its own estimate at i_prev, decoded."""
    x_prev = model.decode_first_stage(model.predict_start_from_noise(
        z_prev, t_prev, model.apply_model(z_prev, t_prev, cond)))
    dist, cos = objective(x_prev)
    checks.check(dist, "feature distance (target model features) of the z_prev candidate")
    return dist, cos


def keep_better_prev(dist, best_score, best_z, z_prev):
    """The better z_prev candidate per image (higher −distance); → (score, latent, better)."""
    better = -dist > best_score
    best_z = z_prev if best_z is None else torch.where(per_image(better), z_prev, best_z)
    return torch.where(better, -dist, best_score), best_z, better


def no_candidate(batch: int, device) -> torch.Tensor:
    return torch.full((batch,), -math.inf, device=device)
