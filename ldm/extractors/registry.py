"""Extractors by name: `library:model[@layer]`.

    torchvision:resnet50           the paper's ResNet-50 (IMAGENET1K_V1, reference preprocessing)
    torchvision:vit_h_14           the paper's ViT-H/14 (IMAGENET1K_SWAG_E2E_V1, 518 px)
    open_clip:RN50                 the paper's CLIP RN50 (OpenAI weights; text targets)
    torchvision:convnext_tiny      any torchvision classification model
    timm:resnet18, timm:vit_small_patch16_224.augreg_in21k   any timm model [and tag]
    open_clip:ViT-B-32             any open_clip model
    toy:<name>                     the toy world's extractors (ldm/toy/extractors.py)
    torchvision:resnet50@layer3    the output of submodule `layer3` (pooled, or a map if spatial)

Short names from before the registry stay valid: resnet50, vit_h_14, clip_rn50 and the toy's
toy_<name> (with an optional @layer too); an extractor built from one keeps the short `name`,
any other gets the full spec as its `name`. A class of the user's is a name too
(`register_extractor`, or `module:Class` / `file.py:Class`).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
import functools
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.choices import PAPER_ALIASES
from ldm.extractors.base import FeatureExtractor
from ldm.extractors.errors import ExtractorSpecError
from ldm.extractors.clip import ClipRN50Extractor, OpenClipExtractor
from ldm.extractors.layers import layer_names
from ldm.extractors.torchvision_models import (ResNet50Extractor, TorchvisionExtractor,
                                               VitH14Extractor, torchvision_file_tag,
                                               torchvision_models, unknown_torchvision_model)
from ldm.extractors.weights import RANDOM, weights_kind

GRAMMAR = "library:model[@layer]"


@dataclass(frozen=True)
class Library:
    """One library's entry: how to build one of its models, and how to list them."""

    build: Callable        # (spec, weights, weights_tag, device, spatial) → FeatureExtractor
    models: Callable       # () → every model name
    supports_text: bool | Callable = False   # or model name → bool


LIBRARIES: dict[str, Library] = {}
# Modules above this one that register libraries (imported on first use, as entry points are).
PLUGINS = ("ldm.toy.extractors",)


def register_library(name: str, models: Callable, supports_text: bool | Callable = False):
    """Register the decorated builder as library `name` (timm's @register_model, for libraries)."""
    def decorate(build):
        LIBRARIES[name] = Library(build, models, supports_text)
        return build
    return decorate


def register_alias(short: str, spec: str) -> None:
    """`short[@layer]` becomes a name of `spec` ("library:model")."""
    ALIASES[short] = spec


@functools.cache
def load_plugins() -> None:
    for module in PLUGINS:
        importlib.import_module(module)


def register_extractor(name: str | None = None):
    """Class decorator: a `FeatureExtractor` subclass (built as `cls(weights, device=...)`)
    becomes the registry name `name` (default: its `name` attribute), which then works
    wherever a registry name does (`name@layer`, spatial, the command line, FeatInv training)."""
    def decorate(cls: type[FeatureExtractor]) -> type[FeatureExtractor]:
        key = name or cls.name
        if not key or ":" in key or "@" in key or any(c.isspace() for c in key):
            raise ExtractorSpecError(f"{cls.__name__}: {key!r} is not a usable extractor name "
                                     "(no ':', '@' or spaces)")
        load_plugins()
        if key in ALIASES and key not in LOCAL_CLASSES:   # a class of the user's may be redefined
            raise ExtractorSpecError(f"{cls.__name__}: the extractor name {key!r} is taken by "
                                     f"{ALIASES[key]}; give the class another `name`")
        LOCAL_CLASSES[key] = cls
        register_alias(key, f"local:{key}")
        return cls
    return decorate


# The paper's models and the weights they were run with: with those (or a file, or "random")
# a spec builds the paper class; another tag builds the generic extractor with its own transforms.
PAPER: dict[tuple[str, str], tuple[type[FeatureExtractor], str]] = {
    ("torchvision", "resnet50"): (ResNet50Extractor, "IMAGENET1K_V1"),
    ("torchvision", "vit_h_14"): (VitH14Extractor, "IMAGENET1K_SWAG_E2E_V1"),
    ("open_clip", "RN50"): (ClipRN50Extractor, "openai"),
}
ALIASES = dict(PAPER_ALIASES)   # the toy layer and register_extractor add theirs
LOCAL_CLASSES: dict[str, type[FeatureExtractor]] = {}   # register_extractor's


@dataclass(frozen=True)
class ExtractorSpec:
    library: str
    model: str
    layer: str | None = None
    alias: str | None = None  # the short name it was given by, if any

    def __str__(self) -> str:
        return f"{self.library}:{self.model}" + (f"@{self.layer}" if self.layer else "")

    @property
    def name(self) -> str:
        """The extractor's `name`: the short name if given by one, else the full spec."""
        if self.alias:
            return self.alias + (f"@{self.layer}" if self.layer else "")
        return str(self)

    @property
    def supports_text(self) -> bool:
        """Text targets work (known without building): a text library's default feature."""
        text = LIBRARIES[self.library].supports_text
        return (text(self.model) if callable(text) else text) and self.layer is None


def _spec_error(spec: str, why: str) -> ExtractorSpecError:
    return ExtractorSpecError(
        f"extractor {spec!r}: {why}. Expected {GRAMMAR}, e.g. torchvision:resnet50, "
        f"timm:resnet18@layer2.1, open_clip:RN50; libraries: {', '.join(LIBRARIES)}; short "
        f"names: {', '.join(sorted(ALIASES))}")


def parse_spec(spec: str) -> ExtractorSpec:
    """`library:model[@layer]` or `short_name[@layer]` → ExtractorSpec (checks the grammar and
    the library; whether the model and layer exist is checked when building)."""
    load_plugins()
    if not isinstance(spec, str) or not spec.strip():
        raise _spec_error(str(spec), "empty")
    spec = spec.strip()
    if any(c.isspace() for c in spec) or spec.count("@") > 1:
        raise _spec_error(spec, "spaces or more than one '@'")
    head, at, layer = spec.partition("@")
    if at and not layer:
        raise _spec_error(spec, "nothing after '@' (a submodule path such as layer3 or blocks.5)")
    if head in ALIASES:
        library, _, model = ALIASES[head].partition(":")
        return ExtractorSpec(library, model, layer or None, alias=head)
    library, colon, model = head.rpartition(":") if is_code_path(head) else head.partition(":")
    if is_code_path(head):
        key = register_extractor()(import_extractor_class(library, model)).name
        return ExtractorSpec("local", key, layer or None, alias=key)
    if not colon:
        close = difflib.get_close_matches(head, list(ALIASES), n=3, cutoff=0.6)
        raise _spec_error(spec, f"not a short name (close: {', '.join(close)})" if close
                          else "no 'library:'")
    normal = library.lower().replace("-", "_")
    normal = "open_clip" if normal == "openclip" else normal
    if normal not in LIBRARIES:
        raise _spec_error(spec, f"unknown library {library!r}")
    if not model or ":" in model:
        raise _spec_error(spec, f"bad model name {model!r}")
    return ExtractorSpec(normal, model, layer or None)


def _paper_class(spec: ExtractorSpec, weights, weights_tag):
    """The paper class of `spec`, if the weights are the paper's (default, file, random)."""
    paper, paper_tag = PAPER.get((spec.library, spec.model), (None, None))
    tag = resolved_tag(spec, weights, weights_tag)
    return paper if paper is not None and tag in (None, paper_tag) else None


def resolved_tag(spec: ExtractorSpec, weights, weights_tag: str | None) -> str | None:
    """The library tag the weights are: a tag given as `weights`, else `weights_tag`, else
    (torchvision) the tag whose file has that name; None for the library's default."""
    kind = weights_kind(weights)
    if kind == "tag":
        if weights_tag is not None and weights_tag != weights:
            raise ExtractorSpecError(f"weights {weights!r} and weights tag {weights_tag!r} disagree: "
                                     "give the tag once")
        return str(weights)
    if weights_tag is None and kind == "file" and spec.library == "torchvision":
        return torchvision_file_tag(spec.model, weights)
    return weights_tag


@register_library("torchvision", models=torchvision_models)
def _torchvision(spec, weights, weights_tag, device, spatial):
    if spec.model not in torchvision_models():
        raise unknown_torchvision_model(spec.model)
    return TorchvisionExtractor(weights, arch=spec.model, device=device, layer=spec.layer,
                                spatial=spatial, tag=resolved_tag(spec, weights, weights_tag))


def _timm_models() -> list[str]:
    import timm
    return timm.list_models()


@register_library("timm", models=_timm_models)
def _timm(spec, weights, weights_tag, device, spatial):
    from ldm.extractors.timm_models import TimmExtractor
    return TimmExtractor(spec.model, weights, device=device, layer=spec.layer, spatial=spatial,
                         tag=weights_tag)


def _open_clip_models() -> list[str]:
    import open_clip
    return open_clip.list_models()


@register_library("open_clip", models=_open_clip_models, supports_text=True)
def _open_clip(spec, weights, weights_tag, device, spatial):
    return OpenClipExtractor(spec.model, weights, device=device, layer=spec.layer, spatial=spatial,
                             tag=weights_tag)


@register_library("local", models=lambda: list(LOCAL_CLASSES),
                  supports_text=lambda model: LOCAL_CLASSES[model].supports_text())
def _local(spec, weights, weights_tag, device, spatial):
    cls = LOCAL_CLASSES.get(spec.model)
    if cls is None:
        raise _spec_error(str(spec), "no class registered under that name (ldm.extractors."
                          "register_extractor, or name it as module:Class / path.py:Class)")
    return cls(weights, device=device).set_layer(spec.layer, spatial)


def build_extractor(spec: str, *, weights: str | None = None, weights_tag: str | None = None,
                    device="cpu", spatial: bool = False) -> FeatureExtractor:
    """The extractor named by `spec` (see the module doc), frozen, in eval mode, on `device`.

    `weights`: None (the library's default weights, the paper's for the paper models: cache,
    else download, else WeightsNotFoundError saying where to put the file); a tag of the
    library (torchvision "IMAGENET1K_V2", timm "a1_in1k", open_clip "laion2b_s34b_b79k"); a
    local file (safe loader, strict keys, with or without the classifier head); or "random":
    random initialisation, nothing read or downloaded (tests, timing).
    `weights_tag`: the tag a local file holds, for its preprocessing (torchvision's own file
    names, e.g. resnet50-11ad3fa6.pth, are recognised without it).
    `spatial`: with a layer, keep its map [B, C, H, W] instead of pooling to [B, C].
    Spec, tag or layer mistakes raise ExtractorSpecError (UnknownLayerError for layers) before
    any weights are read."""
    parsed = parse_spec(spec)
    paper = _paper_class(parsed, weights, weights_tag)
    if paper is not None:
        extractor = paper(weights, device=device, layer=parsed.layer, spatial=spatial)
    else:
        extractor = LIBRARIES[parsed.library].build(parsed, weights, weights_tag, device, spatial)
    extractor.name = parsed.name
    return extractor


def list_extractors(library: str | None = None) -> list[str]:
    """Without `library`: the short names and the named entries (paper and toy models); with
    one: every model spec of that library (timm: ~1300 architectures, each takes a tag)."""
    load_plugins()
    if library is None:
        return [*ALIASES, *ALIASES.values()]
    if library not in LIBRARIES:
        raise ExtractorSpecError(f"unknown library {library!r}; libraries: {', '.join(LIBRARIES)}")
    return [f"{library}:{m}" for m in LIBRARIES[library].models()]


def list_layers(spec: str) -> list[str]:
    """Every layer name `spec` accepts after '@' (built on the meta device: nothing loaded)."""
    parsed = parse_spec(spec)
    if parsed.library == "toy":
        return layer_names(build_extractor(str(parsed).partition("@")[0]).layer_root())
    with torch.device("meta"):
        extractor = build_extractor(str(parsed).partition("@")[0], weights=RANDOM, device="meta")
    return layer_names(extractor.layer_root())


def is_code_path(head: str) -> bool:
    """`module.path:Class` or `file.py:Class`: a class of the user's own code."""
    where, colon, name = head.rpartition(":")
    return bool(colon and name.isidentifier() and (where.endswith(".py") or "." in where)
                and where.lower() not in LIBRARIES)


def import_extractor_class(where: str, name: str) -> type[FeatureExtractor]:
    """The FeatureExtractor class `name` of the module `where` (a dotted module path or a .py
    file, the user's own code, named on their command line)."""
    try:
        if where.endswith(".py"):
            import importlib.util

            path = Path(where)
            if not path.is_file():
                raise ExtractorSpecError(f"extractor {where}:{name}: no such file {where!r}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as err:
        raise ExtractorSpecError(f"extractor {where}:{name}: cannot import {where!r} ({err})") from None
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, FeatureExtractor)):
        raise ExtractorSpecError(f"extractor {where}:{name}: {where} has no FeatureExtractor "
                                 f"subclass {name!r}")
    if cls.name == FeatureExtractor.name:
        cls.name = name
    return cls


def check_spec(spec: str, spatial: bool = False) -> None:
    """ExtractorSpecError for a spec whose model, layer or readout is wrong, found by building it
    with random weights on the meta device (nothing read or loaded); the toy's are small and
    shipped, and a class of the user's that cannot be built there is checked when it is built."""
    library = parse_spec(spec).library
    if library == "toy":
        return
    try:
        with torch.device("meta"):
            build_extractor(spec, weights=RANDOM, device="meta", spatial=spatial)
    except ExtractorSpecError:
        raise
    except Exception:
        if library != "local":
            raise
