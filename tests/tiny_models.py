"""Tiny stand-ins shared by the sampler and CLI tests: a tiny SD-v1-shaped model with a short
schedule, and a tiny feature extractor."""
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.extractors.base import FeatureExtractor
from ldm.models.loading import build_model

TINY_CONFIG = "configs/tiny/sd-v1-tiny.yaml"


def tiny_config(timesteps: int = 20):
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.timesteps = timesteps
    return config


def tiny_model(timesteps: int = 20, seed: int = 0):
    """Tiny LDM with random weights (zero-initialised output convs made non-zero)."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(timesteps))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 and not name.startswith("cond_stage_model"):
                p.normal_(0, 0.1)
    return model


class TinyExtractor(FeatureExtractor):
    """Conv → ReLU → pool: an 8-d feature of a 16x16 image."""

    name = "tiny"
    input_size = 16

    def __init__(self, weights: str | None = None, device="cpu", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        if weights:
            self.net.load_state_dict(torch.load(weights, weights_only=True))
        self.freeze().to(device)

    def encode(self, x):
        return self.net(x)


def write_tiny_sd(folder, timesteps: int = 20):
    """tiny.yaml and tiny.ckpt (a Lightning-style {"state_dict": ...}) in `folder`; → folder."""
    OmegaConf.save(tiny_config(timesteps), folder / "tiny.yaml")
    torch.save({"state_dict": tiny_model(timesteps).state_dict()}, folder / "tiny.ckpt")
    return folder
