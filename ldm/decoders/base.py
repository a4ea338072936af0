"""The decoder-kind interface and its registry.

A kind is built from `DecoderOptions` (what the user chose: the kind and, for trained kinds,
the decoder file and its sampling), then, in this order: `check` (before anything loads: the
files it needs, that they suit the target model), `load_model` (the latent diffusion model it
samples), `bind` (the target model built: anything read with it), and per batch `sample`.
`iterations`, `describe` (metrics.json's "decoder") and `fingerprinted` (what a resumed run must
share) say what it runs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DecoderOptions:
    """The user's choice of decoder: `kind` (a registered name) and, for a trained decoder, its
    `file`, DDIM `steps`, classifier-free `guidance` scale, and the target model's weights its
    hint extractor (the decoder's layer of the same network) is built with."""

    kind: str = "guided"
    file: str | None = None
    steps: int = 50
    guidance: float = 1.75
    extractor_weights: str | None = None


@dataclass
class Sampling:
    """One batch to sample, apart from the model and the objective: the latent `shape` [B, C, h, w],
    one generator per target, the guided sampler's `settings`, the empty-prompt `cond`, a
    trained decoder's `hints` [B, ...], the autocast `precision`, the fast path's
    `gradient_decoder`, and the sampler's callbacks (`on_record`, `progress`, ...)."""

    shape: tuple[int, int, int, int]
    generators: list[torch.Generator]
    settings: object = None
    cond: torch.Tensor | None = None
    hints: torch.Tensor | None = None
    precision: str = "fp32"
    gradient_decoder: object = None
    callbacks: dict = field(default_factory=dict)


class DecoderKind(ABC):
    """One way of decoding a feature into images (see the module docstring)."""

    name: ClassVar[str]
    needs_file: ClassVar[bool] = False      # a trained decoder file (--featinv_decoder)
    default_preset: ClassVar[str | None] = None   # applied when the user names no --preset
    guided: ClassVar[bool] = True           # follows the guided sampler's settings

    def __init__(self, options: DecoderOptions):
        self.options = options

    def check(self, extractor_name: str) -> None:
        """ValueError for anything that can be known wrong before a model loads."""

    @abstractmethod
    def load_model(self, config, ckpt, device, missing_hint: str | None = None):
        """The latent diffusion model this kind samples."""

    def bind(self, extractor, device) -> None:
        """Called once the target model is built."""

    @abstractmethod
    def iterations(self, model, settings) -> int:
        """Denoising iterations of one decode."""

    @abstractmethod
    def sample(self, model, objective, sampling: Sampling):
        """Decode one batch; → `GuidedResult`."""

    def hint(self, target, goal: torch.Tensor):
        """A trained decoder's hint for `target` (whose feature is `goal`); None for others."""
        return None

    def image_hints(self, images: torch.Tensor, goals: torch.Tensor):
        """A trained decoder's hints for target images in [-1, 1] whose features are `goals`
        [B, ...]; None for others."""
        return None

    def describe(self) -> dict:
        """metrics.json's record of the decoder."""
        return {"kind": self.name}

    def fingerprinted(self) -> dict:
        """{option name: value} that a resumed run must share (a Path: the file's identity)."""
        return {}

    def label(self, settings) -> str:
        """How a run announces its iterations ("1000 guided iterations")."""
        return "guided" if settings.forward_guidance else "unguided"
