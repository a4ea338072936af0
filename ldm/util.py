"""Config helpers, in the CompVis style (`target:` + `params:`)."""
import importlib

from omegaconf import DictConfig, OmegaConf


def get_obj_from_str(string: str):
    module, cls = string.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"config target {string!r} cannot be imported: {err}") from err


def instantiate_from_config(config):
    """Build `config.target(**config.params)`."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, dict) or "target" not in config:
        raise KeyError(f"expected a config with a `target:` key, got {config!r}")
    return get_obj_from_str(config["target"])(**config.get("params", {}) or {})


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
