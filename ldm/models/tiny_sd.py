"""A tiny stand-in for Stable Diffusion v1: the same classes, key layout and schedule as SD v1
at small widths (configs/tiny/sd-v1-tiny.yaml), with random weights. It runs every SD script
end to end in seconds on a CPU without the 4 GB checkpoint (its images are noise: it was never
trained); the tests use it too.

    python scripts/make_tiny_sd.py outputs/tiny_sd
    python scripts/resnet50_guided.py --config outputs/tiny_sd/tiny.yaml \\
        --ckpt outputs/tiny_sd/tiny.safetensors --H 16 --W 16 --extractor_weights random ...
"""
import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.models.loading import build_model
from ldm.paths import shipped

TINY_CONFIG = shipped("configs/tiny/sd-v1-tiny.yaml")
MAX_TIMESTEPS = 100_000


def tiny_config(timesteps: int = 1000):
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.timesteps = timesteps
    return config


def tiny_model(timesteps: int = 1000, seed: int = 0):
    """The tiny LDM with random weights (its zero-initialised output convolutions made
    non-zero, so that guidance has a gradient to follow)."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(timesteps))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 and not name.startswith("cond_stage_model"):
                p.normal_(0, 0.1)
    return model


def write_tiny_sd(folder: str | Path, timesteps: int = 1000, seed: int = 0) -> Path:
    """`folder`/tiny.yaml and `folder`/tiny.safetensors; → folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(tiny_config(timesteps), folder / "tiny.yaml")
    save_file(tiny_model(timesteps, seed).state_dict(), str(folder / "tiny.safetensors"))
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight SD v1 stand-in.")
    parser.add_argument("out", help="folder for tiny.yaml and tiny.safetensors")
    parser.add_argument("--timesteps", type=int, default=1000, help="length of its schedule")
    parser.add_argument("--seed", type=int, default=0, help="seed of its random weights")
    args = parser.parse_args(argv)
    if not 1 <= args.timesteps <= MAX_TIMESTEPS:
        parser.error(f"--timesteps {args.timesteps}: must be from 1 to {MAX_TIMESTEPS:,}")
    folder = write_tiny_sd(args.out, args.timesteps, args.seed)
    print(f"wrote {folder / 'tiny.yaml'} and {folder / 'tiny.safetensors'}: pass them as "
          f"--config and --ckpt, with --H 16 --W 16 (multiples of 4)")
    return 0
