"""Build a latent diffusion model from a config and load its weights, strictly and safely."""
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.checkpoint import SD_V1_IGNORABLE_KEYS, load_into, load_state_dict
from ldm.paths import shipped
from ldm.util import ConfigError, check_config, instantiate_from_config

DEFAULT_CONFIG = str(shipped("configs/stable-diffusion/v1-inference.yaml"))
DEFAULT_CKPT = str(shipped("models/ldm/stable-diffusion/sd-v1-4.ckpt"))

SD_V14_MISSING_HINT = (
    "Stable Diffusion v1.4 weights were not found at {path}.\n"
    "Download sd-v1-4.ckpt (4.27 GB; accept the CreativeML OpenRAIL-M license first) from\n"
    "  https://huggingface.co/CompVis/stable-diffusion-v-1-4-original\n"
    f"and put it at {DEFAULT_CKPT}, or pass --ckpt /path/to/sd-v1-4.ckpt\n"
    "(a .safetensors file with the same keys works too)."
)


def load_config(config_path: str | Path):
    """The config at `config_path` as data: ConfigError if it is missing, not YAML, or names a
    class that is not one of the project's (nothing is built here)."""
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"model config not found: {path} (the SD v1 config ships as {DEFAULT_CONFIG})")
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"model config {path} is not a readable YAML file ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not OmegaConf.is_dict(config) or "model" not in config:
        raise ConfigError(f"model config {path} has no `model:` section (see {DEFAULT_CONFIG})")
    check_config(config.model, "model")
    return config


def _params(config, *keys):
    node = config
    for key in keys:
        node = node.get(key) if OmegaConf.is_dict(node) else None
        if node is None:
            raise ConfigError(f"model config: no {'.'.join(keys)} (see {DEFAULT_CONFIG})")
    return node


def image_multiple(config) -> tuple[int, int]:
    """(the first stage's down-sampling factor, the multiple image sides must be): latents are
    down-sampled again by the UNet's levels (2 ** (len(channel_mult) - 1)), so --H/--W must be
    multiples of both factors' product (64 for SD v1: 8 × 8)."""
    vae = len(_params(config, "model", "params", "first_stage_config", "params", "ddconfig", "ch_mult"))
    unet = len(_params(config, "model", "params", "unet_config", "params", "channel_mult"))
    return 2 ** (vae - 1), 2 ** (vae - 1) * 2 ** (unet - 1)


def build_model(config) -> torch.nn.Module:
    """The model described by `config.model`, with freshly initialised weights."""
    return instantiate_from_config(config.model)


def load_model(config_path: str | Path, ckpt_path: str | Path, device: str | torch.device = "cpu",
               missing_hint: str = SD_V14_MISSING_HINT):
    """Build the model of `config_path` and load `ckpt_path` into it (strict key check).

    The checkpoint is read before the model is built, so that a missing or broken file fails
    in a second instead of after allocating a billion parameters.
    """
    config = load_config(config_path)
    state_dict = load_state_dict(ckpt_path, missing_hint=missing_hint.format(path=ckpt_path))
    model = build_model(config)
    load_into(model, state_dict, ignorable=SD_V1_IGNORABLE_KEYS)
    return model.to(device)
