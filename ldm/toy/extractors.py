"""The toy world's target extractors: small CNNs trained here (scripts/train_toy.py), whose
pooled penultimate layer is the feature. `toy_shape` was trained on shape only, `toy_colour`
on colour only, `toy_all` on every attribute: the ground truth of what each feature encodes."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from ldm.extractors.base import FeatureExtractor
from ldm.extractors.errors import ExtractorSpecError
from ldm.extractors.preprocessing import Preprocessing
from ldm.extractors.registry import list_extractors, register_alias, register_library
from ldm.paths import shipped
from ldm.toy.names import TOY_ALIASES, TOY_NETS
from ldm.toy.nets import load_net

TOY_MODELS = shipped("models/toy")


class ToyExtractor(FeatureExtractor):
    """A `ldm.toy.nets.SmallCNN` on 32x32 images. The network normalises its [0, 1] input
    itself, so the extractor's mean/std are the identity. Layers name submodules of the network
    (`body.0`, ...)."""

    preprocessing = Preprocessing(input_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    weights_file: ClassVar[str] = ""
    encodes: ClassVar[tuple[str, ...]] = ()   # the attributes its training taught (ldm/toy/nets.py)

    def __init__(self, weights: str | None = None, device="cpu", *, layer: str | None = None,
                 spatial: bool = False):
        super().__init__()
        path = Path(weights) if weights else TOY_MODELS / self.weights_file
        if not path.is_file():
            raise FileNotFoundError(f"{self.name} weights not found at {path}: they ship with the "
                                    "repository (models/toy/), or rebuild them with "
                                    "`python scripts/train_toy.py --only extractors`")
        self.net = load_net(str(path))
        self.set_layer(layer, spatial)
        self.freeze().to(device)

    def layer_root(self) -> torch.nn.Module:
        return self.net

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def _toy_class(name: str, encodes: tuple[str, ...]) -> type[ToyExtractor]:
    short = name.removeprefix("toy_")
    return type(f"Toy{short.title()}Extractor", (ToyExtractor,),
                {"name": name, "weights_file": f"extractor_{short}.safetensors", "encodes": encodes})


# The toy extractors, by name (from the one list, ldm/toy/names.py).
TOY_EXTRACTORS: dict[str, type[ToyExtractor]] = {name: _toy_class(name, encodes)
                                                 for name, encodes in TOY_NETS.items()}


@register_library("toy", models=lambda: [name.removeprefix("toy_") for name in TOY_EXTRACTORS])
def _toy(spec, weights, weights_tag, device, spatial):
    toy = TOY_EXTRACTORS.get(f"toy_{spec.model}")
    if toy is None:
        raise ExtractorSpecError(f"extractor {str(spec)!r}: the toy extractors are "
                                 + ", ".join(list_extractors("toy")))
    return toy(weights, device=device, layer=spec.layer, spatial=spatial)


for _name, _spec in TOY_ALIASES.items():
    register_alias(_name, _spec)
