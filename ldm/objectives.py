"""What the decoder minimises: a distance between the features of generated images and a target.

    objective = FeatureDistance(extractor, target)                       # the reference's loss
    objective = FeatureDistance(extractor, target, loss="cosine")        # 1 − cosine similarity
    objective = FeatureDistance(extractor, target, channels="0:64,100")  # a subset of channels

Features may be pooled vectors [B, D] or spatial maps [B, C, H, W] (or any [B, C, ...]): maps
are compared position by position (the distance sums over every channel and position). A
channel subset selects along dimension 1 of both the features and the target, before the
distance. The objective returns (loss [B], cosine similarity [B]); the sampler minimises the
loss and logs both.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ldm.choices import LOSSES



def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a‖² + ‖b‖² − 2a·b per row, in float32 (the reference's expanded form, no square root);
    rows are flattened, so maps are compared position by position."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    return (a * a).sum(-1) + (b * b).sum(-1) - 2 * (a * b).sum(-1)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per row of the flattened features, in float32."""
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=-1)


def parse_channels(spec: str | list[int] | tuple[int, ...] | None, size: int | None = None) -> list[int] | None:
    """"0:64,100,200:210" (Python-style half-open ranges and single indices) → sorted unique
    indices; a list of ints passes through. With `size`, every index must be below it."""
    if spec is None:
        return None
    if isinstance(spec, str):
        indices: list[int] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            match = re.fullmatch(r"(\d+)(?::(\d+))?", part)
            if not match:
                raise ValueError(f"channel subset {spec!r}: {part!r} is neither an index (12) nor a "
                                 "range (0:64, end excluded)")
            start, stop = int(match[1]), int(match[2]) if match[2] else int(match[1]) + 1
            if stop <= start:
                raise ValueError(f"channel subset {spec!r}: empty range {part!r}")
            indices.extend(range(start, stop))
    else:
        indices = [int(i) for i in spec]
    if not indices:
        raise ValueError(f"channel subset {spec!r} selects no channel")
    if min(indices) < 0:
        raise ValueError(f"channel subset {spec!r}: negative index")
    if size is not None and max(indices) >= size:
        raise ValueError(f"channel subset {spec!r}: index {max(indices)} is out of range for "
                         f"features with {size} channels (0 to {size - 1})")
    return sorted(set(indices))


def check_target(target: torch.Tensor, channels: str | list[int] | None = None,
                 model: torch.nn.Module | None = None) -> None:
    """ValueError unless the target feature [1, ...] is finite and not zero everywhere on the
    compared channels (a zero target has no direction: its cosine similarity is undefined).
    `model`: the target model, blamed for a non-finite feature when its weights are."""
    if not bool(torch.isfinite(target).all()):
        broken = [] if model is None else [name for name, p in model.named_parameters()
                                           if not bool(torch.isfinite(p).all())]
        if broken:
            raise ValueError(f"the target model's weights hold NaN or inf values ({', '.join(broken[:3])}), "
                             "so every feature it computes does: check --extractor_weights")
        raise ValueError("the target feature holds NaN or inf values")
    index = parse_channels(channels, target.shape[1])
    compared = target if index is None else target[:, index]
    if not bool(compared.abs().sum() > 0):
        where = "" if index is None else " on the compared channels (--channels)"
        raise ValueError(f"the target feature is zero everywhere{where}: it has no direction to "
                         "match (its cosine similarity is undefined); choose another target or layer")


class FeatureDistance(nn.Module):
    """Loss between an extractor's features of generated images and fixed target features.

    `target`: [1, ...] (shared by the whole batch) or [B, ...] (one row per batch entry), the
    extractor's feature shape without its batch dimension. `loss`: "squared" (the reference's
    squared Euclidean distance) or "cosine" (1 − cosine similarity, blind to the feature norm).
    `channels`: indices (or a string for `parse_channels`) of dimension 1 to compare.
    """

    def __init__(self, extractor: nn.Module, target: torch.Tensor, *, loss: str = "squared",
                 channels: str | list[int] | None = None):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        target = target.detach().float()
        if target.dim() < 2:
            raise ValueError(f"target features need a batch dimension: got shape {tuple(target.shape)}")
        self.extractor = extractor
        self.loss = loss
        self.channels = parse_channels(channels, target.shape[1])
        if self.channels is not None:
            self.register_buffer("index", torch.tensor(self.channels, device=target.device))
            target = target.index_select(1, self.index)
        self.register_buffer("target", target)

    def select(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.channels is None else features.index_select(1, self.index)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (loss [B], cosine similarity [B]); differentiable in the loss."""
        features = self.select(self.extractor(images))
        if features.shape[1:] != self.target.shape[1:]:
            raise ValueError(f"the features of generated images have shape {tuple(features.shape[1:])} "
                             f"but the target has {tuple(self.target.shape[1:])}: the target must come "
                             "from the same extractor and layer (and pooling)")
        target = self.target.expand(features.shape[0], *self.target.shape[1:])
        cosine = cosine_similarity(features.detach(), target)
        if self.loss == "cosine":
            return 1 - cosine_similarity(features, target), cosine
        return squared_distance(features, target), cosine
