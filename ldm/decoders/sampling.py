"""The one sampler setup every caller shares (the API, the command line, the benchmarks, the GPU
check): one generator per target, the call to a decoder kind's sampler, and its images in
[-1, 1] brought to [0, 1]."""
from __future__ import annotations

import torch

from ldm.decoders.base import DecoderKind, Sampling


def target_generators(seeds, device="cpu") -> list[torch.Generator]:
    """One generator per target of a batch, target b seeded with seeds[b]: its noise, and so its
    result, does not depend on its batch mates."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


def sample_batch(decoding: DecoderKind, model, objective, shape: tuple[int, int, int, int], seeds, *,
                 settings=None, cond=None, hints=None, precision: str = "fp32", gradient_decoder=None,
                 **callbacks):
    """Decode one batch of `shape` [B, C, h, w] with `decoding` (target b from seeds[b]);
    `callbacks` go to the sampler (on_record, progress, ...); → its `GuidedResult`."""
    generators = target_generators(seeds, model.betas.device)
    return decoding.sample(model, objective, Sampling(shape, generators, settings, cond, hints, precision,
                                                      gradient_decoder, callbacks))


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in about [-1, 1] (a decoder's output) as images in [0, 1]."""
    return ((images + 1) / 2).clamp(0, 1)
