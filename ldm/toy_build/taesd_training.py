"""Distil the toy world's tiny (TAESD-style) decoder from the toy LDM's first stage.

The tiny decoder is to carry the guidance gradient, so it is trained on the latents that
gradient is taken at: scaled first-stage latents of toy images (posterior samples, the space of
the sampler's x̂0 estimates) and, for a fraction of them, the UNet's x̂0 estimates from
`q_sample`d latents at uniformly drawn timesteps (off the data manifold, as mid-sampling
estimates are). Its targets are the full decoder's images of the same latents (L1 + L2 in
pixel space). For the last `gradient_steps` steps a gradient-matching term joins them: the
cosine between the tiny and the full decoder's vector-Jacobian products with random smooth
image directions (what backpropagating a feature loss computes), because matching images
alone leaves the gradients apart: the toy extractors' feature-loss gradients through the two
decoders have a mean cosine of about 0.53, 0.58 with the term. (Much of the full decoder's
gradient runs through its GroupNorm statistics, which couple the whole image; the tiny
decoder has no such path.) CPU, one thread, fixed seeds, about 20 minutes on a shared 2-core CPU:

    python -m ldm.toy_build.taesd_training            # -> models/toy/taesd_decoder.safetensors
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldm.toy.names import TOY_NETS
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.loading import load_model
from ldm.models.taesd import TinyDecoder, TinyDecoderConfig, TinyFirstStage, save_taesd_decoder
from ldm.toy import world
from ldm.toy.defaults import TOY_CKPT, TOY_CKPT_HINT, TOY_CONFIG
from ldm.toy.oracle import gaussian_blur
from ldm.toy_build.nets_training import batched, file_kib, set_threads
from ldm.util import count_params

# 8x8x4 latents -> 32x32 images; width 32 keeps it cheaper than the (already small) full toy
# decoder, which width 64 would not be.
TOY_TAESD = TinyDecoderConfig(width=32, upsamples=2)
DEFAULT_OUT = "models/toy/taesd_decoder.safetensors"
DEFAULT_STEPS = 2000
EVAL_SEED = 4321  # held-out images: no training stage uses this seed
EVAL_TIMESTEPS = (200, 500, 800)
_BATCH = 250  # inference batch size


@torch.no_grad()
def encode_latents(model: LatentDiffusion, images: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled first-stage latents of images in [0, 1]: posterior samples drawn with
    `generator`, or the posterior modes without one."""
    def encode(x):
        posterior = model.encode_first_stage(x * 2 - 1)
        z = posterior.mode() if generator is None else posterior.sample(generator)
        return model.scale_factor * z
    return batched(encode, images, _BATCH)


@torch.no_grad()
def x0_estimates(model: LatentDiffusion, z0: torch.Tensor, generator: torch.Generator,
                 timestep: int | None = None) -> torch.Tensor:
    """The UNet's x̂0 from q_sample(z0, t, noise), at `timestep` or at uniformly drawn ones."""
    def estimate(z):
        t = (torch.randint(model.num_timesteps, (len(z),), generator=generator)
             if timestep is None else torch.full((len(z),), timestep))
        z_t = model.q_sample(z, t, torch.randn(z.shape, generator=generator))
        return model.predict_start_from_noise(z_t, t, model.apply_model(z_t, t, None))
    return batched(estimate, z0, _BATCH)


@torch.no_grad()
def full_decode(model: LatentDiffusion, z: torch.Tensor) -> torch.Tensor:
    return batched(model.decode_first_stage, z, _BATCH)


def latent_vjp(decode: Callable, z: torch.Tensor, direction: torch.Tensor,
               create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode(z), direction · ∂decode(z)/∂z): the gradient with respect to the latent that
    backpropagating an image-space gradient `direction` gives."""
    z = z.detach().requires_grad_(True)
    images = decode(z)
    (vjp,) = torch.autograd.grad((images * direction).sum(), z, create_graph=create_graph)
    return images, vjp


def smooth_directions(n: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """n unit-norm random image directions, in turn white and Gaussian-blurred by 1 and 2 px:
    stand-ins for the image-space gradients of feature losses, whatever their smoothness."""
    noise = torch.randn((n, *shape), generator=generator)
    for k, sigma in enumerate((1.0, 2.0), start=1):
        noise[k::3] = gaussian_blur(noise[k::3], sigma)
    return noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


@dataclass
class DistillationSet:
    """Latents and what the full decoder makes of them."""

    latents: torch.Tensor  # scaled latents
    images: torch.Tensor  # the full decoder's images of them, in [-1, 1]
    directions: torch.Tensor  # random smooth image directions
    vjps: torch.Tensor  # the full decoder's vector-Jacobian products with them


def distillation_set(model: LatentDiffusion, n_images: int, noisy_fraction: float, seed: int
                     ) -> DistillationSet:
    """The set for `n_images` toy images, the first `noisy_fraction` of their latents replaced
    by x̂0 estimates."""
    g = torch.Generator().manual_seed(seed)
    pictures, _ = world.make_dataset(n_images, seed)
    latents = encode_latents(model, pictures, g)
    n_noisy = round(noisy_fraction * n_images)
    latents[:n_noisy] = x0_estimates(model, latents[:n_noisy], g)
    directions = smooth_directions(n_images, pictures.shape[1:], g)
    images, vjps = zip(*(latent_vjp(model.decode_first_stage, latents[i:i + _BATCH],
                                    directions[i:i + _BATCH])
                         for i in range(0, n_images, _BATCH)))
    return DistillationSet(latents, torch.cat(images).detach(), directions, torch.cat(vjps))


def pixel_loss(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(images, target) + F.mse_loss(images, target)


def distillation_loss(tiny: TinyFirstStage, data: DistillationSet, idx: torch.Tensor,
                      gradient_weight: float) -> torch.Tensor:
    """L1 + L2 to the full decoder's images, plus gradient_weight x (1 - cosine) between the
    tiny and the full decoder's vector-Jacobian products (if gradient_weight is not 0)."""
    z, target = data.latents[idx], data.images[idx]
    if not gradient_weight:
        return pixel_loss(tiny(z), target)
    images, vjp = latent_vjp(tiny, z, data.directions[idx], create_graph=True)
    cosine = F.cosine_similarity(vjp.flatten(1), data.vjps[idx].flatten(1))
    return pixel_loss(images, target) + gradient_weight * (1 - cosine.mean())


def fit(tiny: TinyFirstStage, data: DistillationSet, steps: int, gradient_steps: int,
        gradient_weight: float, batch_size: int, lr: float, seed: int,
        log: Callable[[str], None]) -> float:
    """AdamW with a one-cycle schedule on random batches, the gradient term on for the last
    `gradient_steps` steps; -> the final loss."""
    opt = torch.optim.AdamW(tiny.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="taesd", dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        idx = torch.randint(len(data.latents), (batch_size,), generator=g)
        weight = gradient_weight if step >= steps - gradient_steps else 0.0
        loss = distillation_loss(tiny, data, idx, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log(f"taesd step {step} loss {loss.item():.5f} (gradient weight {weight})")
    return loss.item()


def train(out_path: str = DEFAULT_OUT, seed: int = 0, steps: int = DEFAULT_STEPS, *,
          gradient_steps: int | None = None, gradient_weight: float = 0.1,
          batch_size: int = 32, lr: float = 2e-3, n_images: int = 4000,
          noisy_fraction: float = 0.4, config: TinyDecoderConfig = TOY_TAESD,
          ldm_ckpt: str = TOY_CKPT, log: Callable[[str], None] = tqdm.write) -> dict:
    """Distil a tiny decoder from the toy first stage, save it to `out_path` (safetensors, with
    its architecture) and evaluate it on held-out latents; -> metrics. `gradient_steps`
    defaults to the last quarter of `steps`."""
    gradient_steps = steps // 4 if gradient_steps is None else gradient_steps
    model = load_model(TOY_CONFIG, ldm_ckpt, missing_hint=TOY_CKPT_HINT)
    start = time.perf_counter()
    data = distillation_set(model, n_images, noisy_fraction, seed)
    log(f"taesd: {n_images} latents ({noisy_fraction:.0%} x̂0 estimates) decoded in "
        f"{time.perf_counter() - start:.0f}s")
    torch.manual_seed(seed)
    tiny = TinyFirstStage(TinyDecoder(config))
    final_loss = fit(tiny, data, steps, gradient_steps, gradient_weight, batch_size, lr,
                     seed + 1, log)
    tiny.requires_grad_(False).eval()
    save_taesd_decoder(tiny.decoder, out_path)
    metrics = {"steps": steps, "gradient_steps": gradient_steps, "final_loss": round(final_loss, 5),
               "seconds": round(time.perf_counter() - start, 1),
               "params": count_params(tiny), "file_kib": file_kib(out_path)}
    metrics.update(evaluate(tiny, model))
    log(f"taesd: saved {out_path} ({metrics['file_kib']} KiB); {metrics}")
    return metrics


def fidelity(tiny: TinyFirstStage, model: LatentDiffusion, z: torch.Tensor) -> dict:
    """Mean absolute error and mean PSNR (dB) of the tiny decoder's images against the full
    decoder's, both as saved: mapped to [0, 1] and clamped."""
    as_saved = lambda x: ((x + 1) / 2).clamp(0, 1)  # noqa: E731
    tiny_img, full_img = as_saved(batched(tiny, z, _BATCH)), as_saved(full_decode(model, z))
    mse = (tiny_img - full_img).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return {"mae": round((tiny_img - full_img).abs().mean().item(), 5),
            "psnr_db": round((-10 * mse.log10()).mean().item(), 2)}


def gradient_cosine(tiny: TinyFirstStage, model: LatentDiffusion, extractor: torch.nn.Module,
                    z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per latent, the cosine between the gradients of ||f(decode(z)) - target||² with respect
    to z through the tiny and through the full decoder."""
    def gradient(decode):
        z_ = z.clone().requires_grad_(True)
        loss = (extractor(decode(z_)) - target).square().sum()
        return torch.autograd.grad(loss, z_)[0].flatten(1)
    return F.cosine_similarity(gradient(tiny), gradient(model.decode_first_stage), dim=1)


def evaluate(tiny: TinyFirstStage, model: LatentDiffusion, n: int = 200, n_gradients: int = 64,
             seed: int = EVAL_SEED) -> dict:
    """Fidelity on held-out clean latents (posterior modes) and x̂0 estimates at
    EVAL_TIMESTEPS; gradient cosines of each toy extractor's feature loss (the target: the
    feature of another held-out image) at the first `n_gradients` (<= n) clean latents and x̂0
    estimates at t = 500."""
    from ldm.extractors.registry import build_extractor

    g = torch.Generator().manual_seed(seed)
    images, _ = world.make_dataset(n + n_gradients, seed)
    clean = encode_latents(model, images[:n])
    sets = {"clean": clean} | {f"x0_t{t}": x0_estimates(model, clean, g, t) for t in EVAL_TIMESTEPS}
    metrics = {"fidelity": {name: fidelity(tiny, model, z) for name, z in sets.items()}}
    cosines = metrics["gradient_cosine"] = {}
    for spec in TOY_NETS:   # by their short names
        extractor = build_extractor(spec)
        with torch.no_grad():
            target = extractor(images[n:] * 2 - 1)
        cosines[spec] = {}
        for name in ("clean", "x0_t500"):
            cos = gradient_cosine(tiny, model, extractor, sets[name][:n_gradients], target)
            cosines[spec][name] = {"mean": round(cos.mean().item(), 4),
                                   "min": round(cos.min().item(), 4)}
    return metrics


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    train(args.out, args.seed, args.steps)


if __name__ == "__main__":
    main()
