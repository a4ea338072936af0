"""Training of the toy world's latent diffusion model (first stage, then the UNet).

The model is `configs/toy/ldm.yaml`: the same `LatentDiffusion`, `AutoencoderKL` and
`UNetModel` classes as Stable Diffusion v1 at small widths, with the same 1000-step
linear-beta schedule, so the guided sampler runs on it unchanged.

- First stage: L1 + L2 reconstruction plus a small KL term (no perceptual or adversarial
  loss: the world's flat-coloured shapes do not need them).
- scale_factor = 1 / std of the latents (what SD v1's 0.18215 is for its VAE).
- UNet: ε-prediction MSE with uniformly drawn timesteps, an EMA of the weights kept for
  sampling.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldm.models.diffusion.ddpm import LatentDiffusion


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    module.requires_grad_(True)
    return list(module.parameters())


def _cosine_lr(step: int, steps: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_first_stage(model: LatentDiffusion, images: torch.Tensor, *, steps: int, batch_size: int,
                      lr: float, kl_weight: float, seed: int, log: Callable[[str], None]) -> dict:
    """images: [N, 3, H, W] in [0, 1]. Trains model.first_stage_model in place."""
    vae = model.first_stage_model
    params = _trainable(vae)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="first stage", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = images[idx] * 2 - 1
        posterior = vae.encode(x)
        rec = vae.decode(posterior.sample(g))
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.3f}")
            log(f"first_stage step {step} rec {rec_loss.item():.5f} kl {kl.item():.4f}")
    vae.requires_grad_(False)
    return {"steps": steps, "final_rec_loss": rec_loss.item(), "seconds": time.perf_counter() - start}


@torch.no_grad()
def encode_dataset(model: LatentDiffusion, images: torch.Tensor, batch_size: int = 256):
    """→ (posterior means, posterior stds) of the unscaled latents."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = model.encode_first_stage(images[i:i + batch_size] * 2 - 1)
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_error(model: LatentDiffusion, images: torch.Tensor) -> float:
    """Mean absolute error in [0, 1] units of decode(mean latent)."""
    means, _ = encode_dataset(model, images)
    rec = model.first_stage_model.decode(means).clamp(-1, 1)
    return float(((rec + 1) / 2 - images).abs().mean())


def train_unet(model: LatentDiffusion, means: torch.Tensor, stds: torch.Tensor, *, steps: int,
               batch_size: int, lr: float, ema_decay: float, seed: int,
               log: Callable[[str], None]) -> dict:
    """ε-prediction training of model.model on scaled latents; the EMA weights are copied into
    the model at the end."""
    unet = model.model
    params = _trainable(unet)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="unet", dynamic_ncols=True)
    running = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        idx = torch.randint(len(means), (batch_size,), generator=g)
        z0 = model.scale_factor * (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g))
        t = torch.randint(model.num_timesteps, (batch_size,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        loss = F.mse_loss(model.apply_model(model.q_sample(z0, t, noise), t, None), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
            log(f"unet step {step} loss {running:.5f}")
    unet.load_state_dict(ema.state_dict())
    unet.requires_grad_(False)
    return {"steps": steps, "final_loss": running, "seconds": time.perf_counter() - start}


@torch.no_grad()
def sample_unguided(model: LatentDiffusion, n: int, seed: int, batch_size: int = 100) -> torch.Tensor:
    """Plain ancestral DDPM samples (variance β), decoded to [0, 1] images."""
    out = []
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = torch.randn((b, model.channels, model.image_size, model.image_size), generator=g)
        for i in reversed(range(model.num_timesteps)):
            t = torch.full((b,), i, dtype=torch.long)
            eps = model.apply_model(z, t, None)
            if i == 0:
                z = model.predict_start_from_noise(z, t, eps)
                break
            beta, abar = model.betas[i], model.alphas_cumprod[i]
            z = ((z - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt()
                 + beta.sqrt() * torch.randn(z.shape, generator=g))
        out.append(((model.decode_first_stage(z) + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def set_scale_factor(config_path: str, value: float) -> None:
    """Write the trained scale_factor into the config file (its `scale_factor:` line)."""
    import re
    with open(config_path) as f:
        text = f.read()
    text, n = re.subn(r"(?m)^(\s*scale_factor:)\s*[-+.\deE]+", rf"\g<1> {value:.6f}", text)
    if n != 1:
        raise ValueError(f"{config_path}: expected exactly one `scale_factor:` line, found {n}")
    with open(config_path, "w") as f:
        f.write(text)


def train_toy_ldm(config_path: str, weights_path: str, log: Callable[[str], None]) -> dict:
    """The whole toy LDM: data, first stage, scale factor, UNet; saves the model's state_dict
    as safetensors and writes the scale factor into the config. → training metrics."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ldm.models.loading import build_model
    from ldm.toy import world

    config = OmegaConf.load(config_path)
    train = OmegaConf.to_container(config.train)
    torch.manual_seed(train["first_stage"]["seed"])
    model = build_model(config)
    images, _ = world.make_dataset(train["data"]["n"], train["data"]["seed"])
    held_out, _ = world.make_dataset(1000, train["data"]["seed"] + 1000)
    log(f"toy ldm: {len(images)} training images; first stage {sum(p.numel() for p in model.first_stage_model.parameters())} "
        f"params, UNet {sum(p.numel() for p in model.model.parameters())} params")
    metrics = {"first_stage": train_first_stage(model, images, log=log, **train["first_stage"])}
    metrics["first_stage"]["held_out_l1"] = reconstruction_error(model, held_out)
    means, stds = encode_dataset(model, images)
    model.scale_factor = float(1.0 / (means + stds * torch.randn_like(means)).std())
    metrics["scale_factor"] = model.scale_factor
    log(f"toy ldm: reconstruction L1 {metrics['first_stage']['held_out_l1']:.4f} (held out), "
        f"scale_factor {model.scale_factor:.6f}")
    torch.manual_seed(train["unet"]["seed"])
    metrics["unet"] = train_unet(model, means, stds, log=log, **train["unet"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights_path)
    set_scale_factor(config_path, model.scale_factor)
    return metrics
