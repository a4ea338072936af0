"""FLOPs counted by torch.utils.flop_counter (matmuls, convolutions and attention, forward and
backward) around any call, including the sampler's `torch.autograd.grad` to its latent."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks do not support
    `torch.autograd.grad` with respect to a leaf (the sampler's latent): totals only."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs of `fn()` in eager mode (the same at every precision, compiled or not)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with torch.compiler.set_stance("force_eager"), counter:
        fn()
    return float(counter.get_total_flops())


def forward_flops(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args) -> float:
    """FLOPs of `fn(x, *args)` without autograd."""
    with torch.no_grad():
        return counted_flops(lambda: fn(x, *args))


def input_gradient_flops(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args) -> float:
    """FLOPs of `fn(x, *args)` and the backward pass to `x` (frozen weights: no weight gradients)."""
    x = x.detach().requires_grad_(True)
    return counted_flops(lambda: torch.autograd.grad(fn(x, *args).float().sum(), x))
