"""Build a latent diffusion model from a config and load its weights, strictly and safely."""
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import SD_V1_IGNORABLE_KEYS, load_into, load_state_dict
from ldm.util import instantiate_from_config

DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion/sd-v1-4.ckpt"

SD_V14_MISSING_HINT = (
    "Stable Diffusion v1.4 weights were not found at {path}.\n"
    "Download sd-v1-4.ckpt (4.27 GB; accept the CreativeML OpenRAIL-M license first) from\n"
    "  https://huggingface.co/CompVis/stable-diffusion-v-1-4-original\n"
    "and put it at models/ldm/stable-diffusion/sd-v1-4.ckpt, or pass --ckpt /path/to/sd-v1-4.ckpt\n"
    "(a .safetensors file with the same keys works too)."
)


def load_config(config_path: str | Path):
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path} (the SD v1 config ships as {DEFAULT_CONFIG})")
    return OmegaConf.load(path)


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
