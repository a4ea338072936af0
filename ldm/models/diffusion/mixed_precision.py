"""Precision of a guided run: autocast around the networks, float32 for everything else.

`"bf16"` or `"fp16"` runs the UNet, the first-stage decoder and the objective (the extractor)
under autocast; their outputs are cast back to float32, so the latent, the distance, the
gradient rescaling and clipping and the latent update stay float32. `"fp32"` (the default) runs
everything in float32, as the reference did. Under fp16 the loss of each image is scaled to
`FP16_LOSS_SCALE` before the backward pass, so that the gradient does not underflow to zero in
float16; the per-image rescaling to ‖ε‖ makes the scale irrelevant.
"""
from __future__ import annotations

import contextlib

import torch

from ldm.choices import PRECISION_NAMES

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}   # fp32: no autocast
PRECISIONS: dict[str, torch.dtype | None] = {name: _DTYPES.get(name) for name in PRECISION_NAMES}
FP16_LOSS_SCALE = 2.0 ** 10   # each image's loss is scaled to this before an fp16 backward


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32: no autocast)."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"precision: unknown {precision!r}; choose one of "
                         + ", ".join(PRECISIONS)) from None


def autocast(precision: str, device: torch.device | str):
    """The autocast context of `precision` on `device` (a no-op context for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        raise ValueError(f"precision: {precision!r} needs autocast, which is not available on {device_type}")
    return torch.autocast(device_type, dtype=dtype)


class MixedPrecision:
    """A latent diffusion model whose UNet and decoder, and an objective, run under autocast
    with float32 outputs; everything else is the wrapped model's."""

    def __init__(self, model, objective, precision: str, device: torch.device, gradient_decoder=None):
        with autocast(precision, device):   # fails early where autocast is unavailable
            pass
        self._model, self._objective, self._gradient_decoder = model, objective, gradient_decoder
        self._precision, self._device = precision, device

    def __getattr__(self, name):
        return getattr(self._model, name)

    def apply_model(self, z_t, t, cond):
        with autocast(self._precision, self._device):
            return self._model.apply_model(z_t, t, cond).float()

    def decode_first_stage(self, z):
        with autocast(self._precision, self._device):
            return self._model.decode_first_stage(z).float()

    def gradient_decode(self, z):
        with autocast(self._precision, self._device):
            return self._gradient_decoder(z).float()

    def objective(self, images):
        with autocast(self._precision, self._device):
            dist, cos = self._objective(images)
        return dist.float(), cos.float()


def guidance_loss(dist: torch.Tensor, precision: str) -> torch.Tensor:
    """The scalar whose gradient guides: −Σ dist. Under fp16 each image's term is scaled to
    FP16_LOSS_SCALE (a per-image constant, which the rescaling to ‖ε‖ cancels)."""
    if precision != "fp16":
        return -dist.sum()
    scale = FP16_LOSS_SCALE / dist.detach().abs().clamp_min(torch.finfo(torch.float32).tiny)
    return -(dist * scale).sum()
