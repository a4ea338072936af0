"""Model configs in the CompVis style (`target:` + `params:`), read as data.

Configs travel with checkpoints, so they come from strangers too: a config may only build the
project's own model classes, listed in `CONFIG_TARGETS` by the names configs use. Every
`target:` of a config is checked against that list before anything is built, and nothing else
is ever imported or called on a config's behalf (the CompVis `instantiate_from_config` builds
any callable it names, `os.system` included).
"""
from __future__ import annotations

import importlib
import inspect

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
# Sane bounds of the sizes a config sets, wherever they appear (SD v1 is well inside them): a
# stranger's config must not make a model allocate terabytes or loop forever.
SIZE_BOUNDS = {name: (1, high) for names, high in (
    (("model_channels", "ch", "hint_hidden_channels", "hidden_size", "intermediate_size"), 16384),
    (("in_channels", "out_channels", "out_ch", "z_channels", "embed_dim", "channels", "hint_channels",
      "projection_dim"), 16384),
    (("context_dim",), 16384), (("num_res_blocks", "transformer_depth", "num_hidden_layers"), 64),
    (("num_attention_heads",), 1024), (("image_size",), 4096), (("resolution",), 8192),
    (("timesteps",), 100_000)) for name in names}
SIZE_LISTS = {"channel_mult": 16, "ch_mult": 16}   # non-empty lists of integers from 1 to this
HEADS = ("num_heads", "num_head_channels")          # -1 (unused), or from 1 to 16384
MAX_LEVELS = 8


class ConfigError(InputError):
    """A model config that cannot be used; the message names the problem and the fix."""


def _target_nodes(config, path: str) -> list[tuple[str, dict]]:
    """Every (where, node with a `target:`) that building `config` would build."""
    found = []
    if isinstance(config, dict):
        if "target" in config:
            found.append((path, config))
        for key, value in config.items():
            if key not in TRAINING_ONLY:
                found += _target_nodes(value, f"{path}.{key}")
    elif isinstance(config, list):
        for k, value in enumerate(config):
            found += _target_nodes(value, f"{path}[{k}]")
    return found


def config_targets(config, path: str = "config") -> list[tuple[str, str]]:
    """Every (where, target) that building `config` would build, nested configs included."""
    return [(where, node["target"]) for where, node in _target_nodes(config, path)]


def check_config(config, path: str = "config") -> None:
    """ConfigError naming the first `target:` that is not one of the project's classes, the
    first size out of bounds (check_config_sizes) or a keyword a class does not take."""
    check_config_targets(config, path)
    plain = _plain(config)
    check_config_sizes(plain, path)
    for where, node in _target_nodes(plain, path):
        params = node.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.params must be a mapping, got {params!r:.100}")
        _check_keywords(get_class(node["target"]), params, where)


def check_config_targets(config, path: str = "config") -> None:
    """ConfigError naming the first `target:` that is not one of the project's classes."""
    for where, target in config_targets(_plain(config), path):
        if not isinstance(target, str) or target not in CONFIG_TARGETS:
            raise ConfigError(
                f"{where}.target {target!r} is not one of this project's model classes, so the "
                "config is refused before anything is built (a config may only build: "
                + ", ".join(sorted(CONFIG_TARGETS)) + ")")


def check_config_sizes(config, path: str = "config") -> None:
    """ConfigError naming the first size in `config` (any `params:` or nested dict) that is not
    an integer within its bounds (SIZE_BOUNDS, SIZE_LISTS, HEADS)."""
    if isinstance(config, list):
        for k, value in enumerate(config):
            check_config_sizes(value, f"{path}[{k}]")
        return
    if not isinstance(config, dict):
        return
    for key, value in config.items():
        where = f"{path}.{key}"
        if key in TRAINING_ONLY:
            continue
        if key in SIZE_BOUNDS and not (key == "context_dim" and value is None):   # None: unconditional
            low, high = SIZE_BOUNDS[key]
            if type(value) is not int or not low <= value <= high:
                raise ConfigError(f"{where} is {value!r:.50}: it must be an integer from {low} to {high:,}")
        elif key in HEADS:
            if type(value) is not int or not (value == -1 or 1 <= value <= 16384):
                raise ConfigError(f"{where} is {value!r:.50}: it must be -1 (unused) or an integer from "
                                  "1 to 16,384")
        elif key in SIZE_LISTS:
            high = SIZE_LISTS[key]
            if (not isinstance(value, list) or not 1 <= len(value) <= MAX_LEVELS
                    or not all(type(v) is int and 1 <= v <= high for v in value)):
                raise ConfigError(f"{where} is {value!r:.80}: it must be a list of 1 to {MAX_LEVELS} "
                                  f"integers from 1 to {high}")
        else:
            check_config_sizes(value, where)


def _check_keywords(cls, params: dict, where: str) -> None:
    """ConfigError for a keyword that `cls` does not take (rather than a TypeError inside it).
    A class whose `**options` go on to another callable names it as `OPTIONS_OF`."""
    parameters = list(inspect.signature(cls).parameters.values())
    if hasattr(cls, "OPTIONS_OF"):
        parameters = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
        parameters += inspect.signature(cls.OPTIONS_OF).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    unknown = sorted(set(params) - {p.name for p in parameters})
    if unknown:
        raise ConfigError(f"{where}.params holds {', '.join(map(repr, unknown))}, which {cls.__name__} "
                          "does not take: remove it from the config")


def _plain(config):
    if isinstance(config, DictConfig):
        try:
            return OmegaConf.to_container(config, resolve=True)
        except (OmegaConfBaseException, RecursionError) as err:   # e.g. a ${} that refers to itself
            raise ConfigError(f"the config's ${{...}} interpolations cannot be resolved "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
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
    check_config(config)
    return get_class(config["target"])(**(config.get("params") or {}))


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
