"""Latent diffusion with a ControlNet: CompVis `cldm.ControlLDM`'s module tree and keys, as
FeatInv (arXiv 2505.21032) uses it to decode a vision model's feature (the "hint") into images.

`ControlLDM` is a frozen `LatentDiffusion` plus `control_model` (a `ControlNet`); its
`apply_model(z_t, t, cond, hint)` is ε(z_t, t, cond, hint), and without a hint the base model's
ε alone. It knows nothing about guidance or samplers: the adapters below bind a hint so that a
ControlLDM exposes exactly the LatentDiffusion denoiser protocol the samplers use.
"""
from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.checkpoint import SD_V1_IGNORABLE_KEYS
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.diffusionmodules.controlnet import ControlledUnetModel
from ldm.util import ConfigError, instantiate_from_config

CONTROL_PREFIX = "control_model."
LATENT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentDiffusion"
CONTROL_LDM = "ldm.models.diffusion.controlled_ddpm.ControlLDM"
CONTROLNET = "ldm.modules.diffusionmodules.controlnet.ControlNet"
CONTROLLED_UNET = "ldm.modules.diffusionmodules.controlnet.ControlledUnetModel"
# The parts of the UNet the ControlNet copies (Zhang et al.: its initialisation).
COPIED_FROM_UNET = ("time_embed", "input_blocks", "middle_block")
# The frozen UNet's decoder half, trained beside the ControlNet when `sd_locked` is False
# (ControlNet's and FeatInv's `ControlLDM.configure_optimizers`).
UNET_DECODER_HALF = ("model.diffusion_model.output_blocks", "model.diffusion_model.out")
# Extras of a checkpoint trained with FeatInv's code (CompVis ControlNet's DDPM): SD v1's, plus
# `logvar`, the loss weighting's log-variances, a buffer there that inference never reads.
FEATINV_IGNORABLE_KEYS = (*SD_V1_IGNORABLE_KEYS, "logvar")


class ControlLDM(LatentDiffusion):
    """`LatentDiffusion` whose UNet is a `ControlledUnetModel`, with a `ControlNet` beside it.

    `control_stage_config` builds the ControlNet; `control_key` (the training batch's hint key
    in `cldm`) is accepted for config compatibility; `only_mid_control` must be False (as
    FeatInv trains). Frozen and in eval mode like LatentDiffusion: training unfreezes
    `trained_part` itself. Dropout in the ControlNet is refused (it would never be active).
    """

    def __init__(self, control_stage_config: dict, control_key: str = "hint",
                 only_mid_control: bool = False, **params):
        del control_key
        if only_mid_control:
            raise ConfigError("ControlLDM: only_mid_control=True is not supported (FeatInv and "
                              "ControlNet train with False)")
        super().__init__(**params)
        if not isinstance(self.model.diffusion_model, ControlledUnetModel):
            raise ConfigError(f"ControlLDM: unet_config must build {CONTROLLED_UNET}")
        self.control_model = instantiate_from_config(control_stage_config)
        if any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.control_model.modules()):
            raise ConfigError("ControlLDM: the ControlNet's dropout must be 0 (the model stays "
                              "in eval mode)")
        self.requires_grad_(False)
        self.eval()

    def apply_model(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                    hint: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise ε for latents `z_t` at timesteps `t`, conditioned on the context
        `cond` and the hint [B, C, h, w] (None: the UNet alone)."""
        context = cond if self.model.conditioning_key else None
        control = None if hint is None else self.control_model(z_t, hint, t, context)
        return self.model.diffusion_model(z_t, t, context=context, control=control)

    @torch.no_grad()
    def init_control_from_unet(self) -> None:
        """ControlNet's initialisation: the copied blocks start as the frozen UNet's weights
        (the hint block and the zero convolutions keep theirs)."""
        unet = self.model.diffusion_model.state_dict()
        own = self.control_model.state_dict()
        copied = {k: unet[k] for k in own if k.split(".", 1)[0] in COPIED_FROM_UNET}
        self.control_model.load_state_dict({**own, **copied})


def control_ldm_config(base: dict, hint_channels: int, hint_hidden_channels: int = 512) -> dict:
    """The ControlLDM config (a `model:` node) of a LatentDiffusion one: the same model, its UNet
    as a ControlledUnetModel, and a ControlNet with the UNet's hyper-parameters."""
    config = (OmegaConf.to_container(base, resolve=True) if isinstance(base, DictConfig)
              else copy.deepcopy(base))
    if config.get("target") != LATENT_DIFFUSION:
        raise ConfigError(f"the base model config must build {LATENT_DIFFUSION}, "
                          f"not {config.get('target')!r}")
    params = config["params"]
    unet = params["unet_config"]
    unet["target"] = CONTROLLED_UNET
    control = {k: v for k, v in unet["params"].items() if k != "out_channels"}
    control.update(hint_channels=hint_channels, hint_hidden_channels=hint_hidden_channels)
    params["control_stage_config"] = {"target": CONTROLNET, "params": control}
    config["target"] = CONTROL_LDM
    return config


def trained_names(sd_locked: bool) -> tuple[str, ...]:
    """The ControlLDM's submodules a training changes: the ControlNet, and with `sd_locked`
    False the UNet's decoder half too."""
    control = CONTROL_PREFIX.removesuffix(".")
    return (control,) if sd_locked else (control, *UNET_DECODER_HALF)


def trained_prefixes(sd_locked: bool) -> tuple[str, ...]:
    """The ControlLDM keys of the trained tensors start with one of these."""
    return tuple(f"{name}." for name in trained_names(sd_locked))


def trained_part(model: ControlLDM, sd_locked: bool) -> tuple[nn.Module, str]:
    """(a module holding the trained submodules, the prefix that makes its state_dict's keys the
    ControlLDM's); it shares their parameters. Locked, it is the ControlNet itself, under
    `control_model.`: the EMA of a training keeps the keys it had before `sd_locked` existed."""
    if sd_locked:
        return model.control_model, CONTROL_PREFIX
    part = nn.Module()
    for name in trained_names(sd_locked):
        *parents, leaf = name.split(".")
        holder = part
        for parent in parents:
            if not hasattr(holder, parent):
                holder.add_module(parent, nn.Module())
            holder = getattr(holder, parent)
        holder.add_module(leaf, model.get_submodule(name))
    return part, ""


def trained_state_dict(model: ControlLDM, sd_locked: bool) -> dict[str, torch.Tensor]:
    """The trained tensors under their ControlLDM keys (`control_model.*`, and unlocked
    `model.diffusion_model.output_blocks.*` and `model.diffusion_model.out.*`)."""
    part, prefix = trained_part(model, sd_locked)
    return {prefix + k: v for k, v in part.state_dict().items()}


def control_state_dict(model: ControlLDM) -> dict[str, torch.Tensor]:
    """The ControlNet's weights under their ControlLDM keys (`control_model.*`)."""
    return trained_state_dict(model, sd_locked=True)


class ControlledDenoiser:
    """A ControlLDM seen through the LatentDiffusion denoiser protocol; subclasses decide how
    `apply_model(z_t, t, cond)` conditions it. Not a module: it holds no weights of its own."""

    def __init__(self, model: ControlLDM):
        self.model = model

    def apply_model(self, z_t, t, cond):
        raise NotImplementedError

    def predict_start_from_noise(self, z_t, t, noise):
        return self.model.predict_start_from_noise(z_t, t, noise)

    def predict_noise_from_start(self, z_t, t, z0):
        return self.model.predict_noise_from_start(z_t, t, z0)

    def decode_first_stage(self, z):
        return self.model.decode_first_stage(z)

    @property
    def betas(self) -> torch.Tensor:
        return self.model.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.model.alphas_cumprod

    @property
    def num_timesteps(self) -> int:
        return self.model.num_timesteps

    @property
    def channels(self) -> int:
        return self.model.channels

    @property
    def latent_downsample_factor(self) -> int:
        return self.model.latent_downsample_factor


def _batched(hint: torch.Tensor, batch: int) -> torch.Tensor:
    if hint.shape[0] == batch:
        return hint
    if hint.shape[0] == 1:
        return hint.expand(batch, *hint.shape[1:])
    raise ValueError(f"a hint batch of {hint.shape[0]} for a batch of {batch} latents")


class HintedDenoiser(ControlledDenoiser):
    """A ControlLDM with a hint batch bound: `apply_model(z_t, t, cond)` is ε(z_t, t, cond, hint),
    for every `cond` (FeatInv: the hint goes to both branches of classifier-free guidance). A
    hint of batch 1 serves every latent."""

    def __init__(self, model: ControlLDM, hint: torch.Tensor):
        super().__init__(model)
        self.hint = hint

    def apply_model(self, z_t, t, cond):
        return self.model.apply_model(z_t, t, cond, hint=_batched(self.hint, z_t.shape[0]))


class HintConditioned(ControlledDenoiser):
    """A ControlLDM whose condition is the hint: `apply_model(z_t, t, hint)` is
    ε(z_t, t, context, hint) with a fixed `context` (None for unconditional models), so that
    classifier-free guidance can run over the hint, a zero hint being the unconditional branch
    (what the training's hint dropout teaches)."""

    def __init__(self, model: ControlLDM, context: torch.Tensor | None = None):
        super().__init__(model)
        self.context = context

    def apply_model(self, z_t, t, cond):
        context = None if self.context is None else _batched(self.context, z_t.shape[0])
        return self.model.apply_model(z_t, t, context, hint=cond)
