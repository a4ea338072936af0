"""Build a latent diffusion model from a config and load its weights, strictly and safely."""
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.checkpoint import SD_V1_IGNORABLE_KEYS, load_into, load_state_dict
from ldm.models.diffusers_folder import folder_config, folder_state_dict, pipeline_folder
from ldm.paths import DEFAULT_CKPT, DEFAULT_CONFIG
from ldm.util import ConfigError, check_config, instantiate_from_config


SD_V14_MISSING_HINT = (
    "Stable Diffusion v1.4 weights were not found at {path}.\n"
    "Download sd-v1-4.ckpt (4.27 GB; accept the CreativeML OpenRAIL-M license first) from\n"
    "  https://huggingface.co/CompVis/stable-diffusion-v-1-4-original\n"
    f"and put it at {DEFAULT_CKPT}, or pass --ckpt /path/to/sd-v1-4.ckpt\n"
    "(a .safetensors file with the same keys, or a diffusers folder of SD v1, works too)."
)


def load_config(config_path: str | Path):
    """The config at `config_path` as data: ConfigError if it is missing, not YAML, or names a
    class that is not one of the project's (nothing is built here). A diffusers folder of SD v1
    gives the config its components' config files describe."""
    folder = pipeline_folder(config_path)
    if folder:
        return folder_config(folder)
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


def config_source(config_path: str | Path, ckpt_path: str | Path) -> str | Path:
    """Where the model's config comes from: a diffusers folder's own configs (no --config
    needed), else `config_path`."""
    return ckpt_path if Path(ckpt_path).is_dir() else config_path


def read_weights(ckpt_path: str | Path, missing_hint: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, or of a diffusers SD v1 folder in our layout."""
    folder = pipeline_folder(ckpt_path)
    return folder_state_dict(folder) if folder else load_state_dict(ckpt_path, missing_hint)


def with_schedule(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` completed with the DDPM schedule buffers (the model's top-level ones) that
    `model` computed from its config, where it has none: a diffusers folder holds none (its
    scheduler config was checked to be SD v1's)."""
    return {**{k: v for k, v in model.state_dict().items() if "." not in k}, **state_dict}


def build_model(config) -> torch.nn.Module:
    """The model described by `config.model`, with freshly initialised weights."""
    return instantiate_from_config(config.model)


def load_model(config_path: str | Path, ckpt_path: str | Path, device: str | torch.device = "cpu",
               missing_hint: str = SD_V14_MISSING_HINT):
    """Build the model of `config_path` and load `ckpt_path` into it (strict key check).

    The weights are read before the model is built, so that a missing or broken file fails
    in a second instead of after allocating a billion parameters. A diffusers folder as
    `ckpt_path` brings its own config (`config_path` is then not read).
    """
    config = load_config(config_source(config_path, ckpt_path))
    state_dict = read_weights(ckpt_path, missing_hint=missing_hint.format(path=ckpt_path))
    model = build_model(config)
    load_into(model, with_schedule(model, state_dict), ignorable=SD_V1_IGNORABLE_KEYS)
    return model.to(device)
