"""Targets turned into feature tensors by an extractor (no diffusion model needed)."""
from __future__ import annotations

import torch

from ldm.extractors import FeatureExtractor
from ldm.objectives import cosine_similarity, parse_channels, squared_distance
from ldm.targets import (Target, TargetError, expand_targets, load_feature_file, read_image,
                         target_features)


def describe_target(target) -> str:
    """How an error names a target: its kind and source, or that it was a tensor."""
    if isinstance(target, Target):
        return f"{target.kind} target {target.source!r}"
    return "the target tensor" if isinstance(target, torch.Tensor) else f"target {target!r}"


class TargetFeatures:
    """Turns targets into feature tensors with an extractor (no diffusion model needed)."""

    def __init__(self, extractor: FeatureExtractor):
        self.extractor = extractor
        self._feature_shape = None

    @property
    def device(self) -> torch.device:
        return self.extractor.device

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The extractor's feature shape without the batch dimension (one forward pass, once)."""
        if self._feature_shape is None:
            self._feature_shape = self.extractor.feature_shape()
        return self._feature_shape

    def _leaf(self, kind: str, source: str) -> torch.Tensor:
        if kind == "image":
            return self.extractor.image_features(read_image(source))
        if kind == "text":
            return self.extractor.encode_text([source])
        return load_feature_file(source).to(self.device)

    def __call__(self, target: Target | str | torch.Tensor) -> torch.Tensor:
        """The target's feature tensor [1, ...] on the extractor's device. Warnings (e.g. a
        prompt cut to CLIP's 77 tokens) are passed on."""
        if isinstance(target, torch.Tensor):
            value = target.detach().float().to(self.device)
            if tuple(value.shape) == self.feature_shape:
                value = value.unsqueeze(0)
            if tuple(value.shape) != (1, *self.feature_shape):
                raise TargetError(f"target features of shape {tuple(target.shape)} do not match the "
                                  f"extractor's features {self.feature_shape}")
            return value
        if isinstance(target, str):
            target = expand_targets([target])[0]
        needs_shape = any(kind == "features" for kind, _ in target.leaves())
        with torch.no_grad():
            return target_features(target, self._leaf, self.feature_shape if needs_shape else None)

    def compare(self, features: torch.Tensor, goal: torch.Tensor, channels=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distance, cosine) of extracted features to the goal, on `channels`."""
        index = parse_channels(channels, goal.shape[1])
        if index is not None:
            index = torch.tensor(index, device=features.device)
            features, goal = features.index_select(1, index), goal.index_select(1, index.to(goal.device))
        goal = goal.to(features.device)
        return squared_distance(features, goal), cosine_similarity(features, goal)
