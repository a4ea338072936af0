"""Small building blocks shared by the UNet and the schedule code."""
import math

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2) -> np.ndarray:
    """Betas in float64. LDM's "linear" is linear in sqrt(beta) (diffusers' "scaled_linear")."""
    if schedule == "linear":
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2
    raise ValueError(f"unknown beta schedule {schedule!r}; only 'linear' (the SD v1 schedule) is implemented")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding laid out as [cos | sin], as in the SD v1 UNet."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                            device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (or float64) whatever the input dtype (stable under autocast)."""

    def forward(self, x):
        return super().forward(x if x.dtype == torch.float64 else x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


def maybe_checkpoint(fn, *args, enabled: bool):
    """Gradient checkpointing of `fn(*args)`, only when asked for and a graph is being built."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
