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
