"""Latent diffusion (SD v1): the ε-prediction UNet, the first stage and the text encoder, with
the DDPM schedule buffers. Inference only: sampling algorithms live in their own modules and
only use the methods below."""
import numpy as np
import torch
from torch import nn

from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.util import instantiate_from_config

# Keys of the original LatentDiffusion configs that only matter for training. They are accepted
# so that existing configs load unchanged, and ignored.
TRAINING_ONLY_KEYS = frozenset({
    "num_timesteps_cond", "log_every_t", "first_stage_key", "cond_stage_key", "monitor",
    "cond_stage_trainable", "use_ema", "scheduler_config", "ckpt_path", "ignore_keys",
    "loss_type", "parameterization", "learn_logvar", "logvar_init", "l_simple_weight",
    "original_elbo_weight", "v_posterior", "clip_denoised", "use_positional_encodings",
    "cond_stage_forward", "concat_mode", "scale_by_std", "load_only_unet", "given_betas",
    "cosine_s", "beta_schedule", "base_learning_rate",
})


def _extract(buffer: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """buffer[t] reshaped to broadcast over a tensor with `ndim` dimensions."""
    return buffer[t].reshape(-1, *([1] * (ndim - 1)))


class DiffusionWrapper(nn.Module):
    """Holds the UNet under the key `diffusion_model`, as in the checkpoints."""

    def __init__(self, unet_config: dict, conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in (None, "crossattn"):
            raise ValueError(f"conditioning_key={conditioning_key!r} is not supported "
                             "(SD v1 uses 'crossattn'; unconditional models use null)")
        self.diffusion_model = instantiate_from_config(unet_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, context=None):
        return self.diffusion_model(x, t, context=context if self.conditioning_key else None)


class LatentDiffusion(nn.Module):
    def __init__(self, unet_config: dict, first_stage_config: dict,
                 cond_stage_config: dict | str | None = None, conditioning_key: str | None = None,
                 timesteps: int = 1000, beta_schedule: str = "linear", linear_start: float = 1e-4,
                 linear_end: float = 2e-2, scale_factor: float = 1.0, image_size: int = 64,
                 channels: int = 4, **training_only):
        super().__init__()
        unknown = set(training_only) - TRAINING_ONLY_KEYS
        if unknown:
            raise TypeError(f"LatentDiffusion got unknown config keys {sorted(unknown)}")
        if training_only.get("parameterization", "eps") != "eps":
            raise ValueError("only ε-prediction models ('parameterization: eps') are supported")
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        unconditional = cond_stage_config in (None, "__is_unconditional__")
        self.cond_stage_model = None if unconditional else instantiate_from_config(cond_stage_config)
        self.scale_factor = float(scale_factor)
        self.image_size, self.channels = image_size, channels
        self.num_timesteps = int(timesteps)
        self._register_schedule(make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        """Frozen inference model: stays in eval mode (no dropout)."""
        return super().train(False)

    def _register_schedule(self, betas: np.ndarray) -> None:
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

    @property
    def latent_downsample_factor(self) -> int:
        return self.first_stage_model.downsample_factor

    @property
    def image_multiple(self) -> int:
        """What image sides must be a multiple of: the first stage's down-sampling factor
        times the UNet's (2 per level), 64 for SD v1."""
        from ldm.modules.diffusionmodules.openaimodel import Downsample
        levels = sum(isinstance(m, Downsample) for m in self.model.diffusion_model.modules())
        return self.latent_downsample_factor * 2 ** levels

    # --- the denoiser -------------------------------------------------------------------------
    def apply_model(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Predicted noise ε for latents `z_t` at integer timesteps `t` (shape [B])."""
        return self.model(z_t, t, context=cond)

    def predict_start_from_noise(self, z_t, t, noise):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, z_t.ndim) * z_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, z_t.ndim) * noise)

    def predict_noise_from_start(self, z_t, t, z0):
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, z_t.ndim) * z_t - z0)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, z_t.ndim))

    def q_sample(self, z0, t, noise):
        """Forward process: z_t = sqrt(ᾱ_t) z0 + sqrt(1 - ᾱ_t) ε."""
        return (_extract(self.sqrt_alphas_cumprod, t, z0.ndim) * z0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, z0.ndim) * noise)

    # --- first stage and conditioning -----------------------------------------------------------
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Latent → image in about [-1, 1]. Differentiable: wrap in torch.no_grad() when no
        gradient is needed."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def encode_first_stage(self, x: torch.Tensor):
        """Image in [-1, 1] → posterior over unscaled latents (see get_first_stage_encoding)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior, generator: torch.Generator | None = None):
        return self.scale_factor * posterior.sample(generator)

    def get_learned_conditioning(self, prompts) -> torch.Tensor | None:
        """Context for the UNet's cross-attention (None for unconditional models)."""
        if self.cond_stage_model is None:
            return None
        return self.cond_stage_model.encode(prompts)
