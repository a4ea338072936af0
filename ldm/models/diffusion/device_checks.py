"""Finiteness checks of the guided loop, resolved at the host transfers logging needs anyway.

Checking every tensor for NaN/inf at once would cost one device-host sync per check (12 per
guided iteration before this existed). The checks are gathered on the device instead and
resolved together at the next host transfer: one sync per scored evaluation. Each check
remembers where it was made (timestep, self-recurrence, the sampler state at the start of that
iteration), so a fault reports the place an immediate check would have, and checks are
resolved in the order made.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class NumericalFault(ArithmeticError):
    """A NaN or inf appeared. `timestep`, `recurrence` and `stage` say where; `images` which
    batch entries; `state` is the sampler state at the start of the faulty iteration (its `best`
    holds the best images found before it)."""

    def __init__(self, stage: str, timestep: int, recurrence: int, images: list[int], state):
        which = "" if state is None or state.z.shape[0] == 1 else f" (batch entries {images})"
        super().__init__(f"non-finite values (NaN or inf) in the {stage} at timestep {timestep}, "
                         f"self-recurrence {recurrence}{which}")
        self.stage, self.timestep, self.recurrence, self.images = stage, timestep, recurrence, images
        self.state = state


class DeviceChecks:
    def __init__(self):
        self.pending: list[tuple] = []   # (stage or callback, where, tensor)
        self.where: tuple | None = None  # (timestep, recurrence, state) of the current iteration

    def check(self, x: torch.Tensor, stage: str) -> None:
        """A NaN or inf in any image of x (first dimension: batch) is a fault of `stage`."""
        self.pending.append((stage, self.where, torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)))

    def on_host(self, callback: Callable[[torch.Tensor], None], x: torch.Tensor) -> None:
        """`callback(x on the host)` at the next flush, after the checks made before it."""
        self.pending.append((callback, None, x))

    def flush(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Resolve everything pending (NumericalFault at the first failed check) and return
        `values` on the host (float64, exact for float32), all in one transfer."""
        pending, self.pending = self.pending, []
        tensors = [x for _, _, x in pending] + list(values)
        if not tensors:
            return []
        flat = torch.cat([x.detach().reshape(-1).to(torch.float64) for x in tensors]).cpu()
        host = [part.reshape(x.shape) for part, x in
                zip(flat.split([x.numel() for x in tensors]), tensors)]
        for (what, where, _), x in zip(pending, host):
            if callable(what):
                what(x)
            elif not bool(x.all()):
                timestep, recurrence, state = where
                raise NumericalFault(what, timestep, recurrence,
                                     (x == 0).nonzero().flatten().tolist(), state)
        return host[len(pending):]
