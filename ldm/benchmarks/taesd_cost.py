"""What carrying the guidance gradient costs through the full first-stage decoder and through
the tiny TAESD-style one: parameters, FLOPs (forward, and forward + backward to the latent, the
weights frozen as in guidance) and CPU seconds.

    python -m ldm.benchmarks.taesd_cost          # SD v1 and toy sizes, one thread; prints JSON

Weights are random (costs do not depend on them). FLOPs are counted on the meta device, so the
SD decoder at 64x64 latents costs nothing to count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.benchmarks.flops import forward_flops, input_gradient_flops
from ldm.models.taesd import SD_V1, TinyDecoder, TinyDecoderConfig, TinyFirstStage
from ldm.util import count_params, instantiate_from_config

SD_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
TOY_CONFIG = "configs/toy/ldm.yaml"


class FullFirstStage(nn.Module):
    """`LatentDiffusion.decode_first_stage` without the rest of the model: scaled latents ->
    images in [-1, 1] through the KL autoencoder's post_quant_conv and decoder."""

    def __init__(self, config_path: str):
        super().__init__()
        params = OmegaConf.load(config_path).model.params
        autoencoder = instantiate_from_config(params.first_stage_config)
        self.post_quant_conv, self.decoder = autoencoder.post_quant_conv, autoencoder.decoder
        self.scale_factor = float(params.scale_factor)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z / self.scale_factor))


def _forward_backward(decode: nn.Module, latents: torch.Tensor) -> None:
    z = latents.clone().requires_grad_(True)
    decode(z).sum().backward()


def count_flops(decode: nn.Module, latents: torch.Tensor) -> dict[str, float]:
    """FLOPs of decode(latents) and of it plus the backward pass to the latents."""
    decode.requires_grad_(False)
    return {"forward": forward_flops(decode, latents), "forward_backward": input_gradient_flops(decode, latents)}


def cpu_seconds(decode: nn.Module, latents: torch.Tensor, repeats: int = 3) -> float:
    """Median wall-clock seconds of forward + backward to the latents, after one warm-up."""
    decode.requires_grad_(False)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        _forward_backward(decode, latents)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def compare(full: Callable[[], nn.Module], tiny_config: TinyDecoderConfig,
            latent_side: int, time_side: int | None = None) -> dict:
    """Parameters and FLOPs at latent_side x latent_side latents (and CPU seconds at time_side,
    if given) of the full decoder that `full()` builds and of a tiny decoder."""
    builders = {"full": full, "tiny": lambda: TinyFirstStage(TinyDecoder(tiny_config))}
    shape = (1, tiny_config.latent_channels, latent_side, latent_side)
    result = {"flops_at_latents": f"{latent_side}x{latent_side}",
              "cpu_at_latents": time_side and f"{time_side}x{time_side}"}
    for name, build in builders.items():
        with torch.device("meta"):
            decode = build()
        entry = {"params": count_params(decode),
                 **count_flops(decode, torch.empty(shape, device="meta"))}
        if time_side is not None:
            side = (1, tiny_config.latent_channels, time_side, time_side)
            entry["cpu_s_forward_backward"] = cpu_seconds(build(), torch.randn(side))
        result[name] = entry
    return result


def main(argv=None) -> None:
    from ldm.toy_build.taesd_training import TOY_TAESD

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"sd_v1": compare(lambda: FullFirstStage(SD_CONFIG), SD_V1, 64, time_side=32),
              "toy": compare(lambda: FullFirstStage(TOY_CONFIG), TOY_TAESD, 8, time_side=8)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
