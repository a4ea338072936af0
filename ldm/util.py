"""Model configs in the CompVis style (`target:` + `params:`), read as data.

Configs travel with checkpoints, so they come from strangers too: a config may only build the
project's own model classes, listed in `CONFIG_TARGETS` by the names configs use. Every
`target:` of a config is checked against that list before anything is built, and nothing else
is ever imported or called on a config's behalf (the CompVis `instantiate_from_config` builds
any callable it names, `os.system` included).
"""
from __future__ import annotations

import importlib

from omegaconf import DictConfig, OmegaConf

from ldm.errors import InputError

# Config name → the class it builds (module path, class name). Only these can be built.
CONFIG_TARGETS: dict[str, tuple[str, str]] = {
    "ldm.models.diffusion.ddpm.LatentDiffusion": ("ldm.models.diffusion.ddpm", "LatentDiffusion"),
    "ldm.modules.diffusionmodules.openaimodel.UNetModel":
        ("ldm.modules.diffusionmodules.openaimodel", "UNetModel"),
    "ldm.models.autoencoder.AutoencoderKL": ("ldm.models.autoencoder", "AutoencoderKL"),
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder":
        ("ldm.modules.encoders.modules", "FrozenCLIPEmbedder"),
    "ldm.models.diffusion.controlled_ddpm.ControlLDM":
        ("ldm.models.diffusion.controlled_ddpm", "ControlLDM"),
    "ldm.modules.diffusionmodules.controlnet.ControlNet":
        ("ldm.modules.diffusionmodules.controlnet", "ControlNet"),
    "ldm.modules.diffusionmodules.controlnet.ControlledUnetModel":
        ("ldm.modules.diffusionmodules.controlnet", "ControlledUnetModel"),
    # the names of CompVis ControlNet's (and FeatInv's) configs
    "cldm.cldm.ControlLDM": ("ldm.models.diffusion.controlled_ddpm", "ControlLDM"),
    "cldm.cldm.ControlNet": ("ldm.modules.diffusionmodules.controlnet", "ControlNet"),
    "cldm.cldm.ControlledUnetModel": ("ldm.modules.diffusionmodules.controlnet", "ControlledUnetModel"),
}
# Subtrees of the original configs that only training reads: never built, so not checked.
TRAINING_ONLY = frozenset({"scheduler_config", "lossconfig"})


class ConfigError(InputError):
    """A model config that cannot be used; the message names the problem and the fix."""


def config_targets(config, path: str = "config") -> list[tuple[str, str]]:
    """Every (where, target) that building `config` would build, nested configs included."""
    found = []
    if isinstance(config, dict):
        if "target" in config:
            found.append((path, config["target"]))
        for key, value in config.items():
            if key not in TRAINING_ONLY:
                found += config_targets(value, f"{path}.{key}")
    elif isinstance(config, list):
        for k, value in enumerate(config):
            found += config_targets(value, f"{path}[{k}]")
    return found


def check_config_targets(config, path: str = "config") -> None:
    """ConfigError naming the first `target:` that is not one of the project's classes."""
    for where, target in config_targets(_plain(config), path):
        if not isinstance(target, str) or target not in CONFIG_TARGETS:
            raise ConfigError(
                f"{where}.target {target!r} is not one of this project's model classes, so the "
                "config is refused before anything is built (a config may only build: "
                + ", ".join(sorted(CONFIG_TARGETS)) + ")")


def _plain(config):
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return config


def get_class(target: str):
    """The class a config `target:` names (ConfigError if it is not allowed)."""
    check_config_targets({"target": target})
    module, name = CONFIG_TARGETS[target]
    return getattr(importlib.import_module(module), name)


def instantiate_from_config(config):
    """Build `config.target(**config.params)`, after checking every target it holds."""
    config = _plain(config)
    if not isinstance(config, dict) or "target" not in config:
        raise ConfigError(f"expected a config with a `target:` key, got {config!r}")
    check_config_targets(config)
    params = config.get("params", {}) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"the params of {config['target']} must be a mapping, got {params!r}")
    return get_class(config["target"])(**params)


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
