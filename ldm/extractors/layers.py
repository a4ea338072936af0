"""Reading an intermediate layer: a forward hook on a named submodule, and how its output
becomes a feature.

The hook captures the submodule's output (the first tensor if it returns a tuple or list) and
stops the forward pass there, so later layers cost nothing; the graph up to the layer is
intact, so gradients flow back to the input. A submodule that runs several times per forward
(torchvision ResNet's shared `relu` inside a block) is read at its first call.

Outputs become features as follows (`FeatureExtractor` attributes in brackets):
- [B, C, H, W] maps ([B, H, W, C] if `channels_last`): mean over H, W → [B, C];
  spatial: the map [B, C, H, W].
- [B, N, C] token sequences: the class token (token 0) if the model has one (`class_token`),
  else the mean over the patch tokens (the `prefix_tokens`, e.g. register tokens, left out)
  → [B, C]; spatial: the patch tokens as a grid [B, C, h, w] (`token_grid`, else a square).
- [B, D] vectors: as they are (no spatial map).
"""
from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ldm.extractors.errors import ExtractorSpecError, UnknownLayerError

if TYPE_CHECKING:   # the extractor is passed in; the base class imports this module
    from ldm.extractors.base import FeatureExtractor

_SHOWN = 24


class _Reached(BaseException):
    # BaseException, not Exception: model code that catches Exception must not swallow it.
    pass


def layer_names(root: nn.Module) -> list[str]:
    return [name for name, _ in root.named_modules() if name]


def find_layer(root: nn.Module, layer: str, spec: str = "the model") -> nn.Module:
    modules = dict(root.named_modules())
    if layer and layer in modules:
        return modules[layer]
    raise UnknownLayerError(f"{spec} has no layer {layer!r}; {nearby_names(layer_names(root), layer)}")


def nearby_names(names: list[str], layer: str) -> str:
    """'valid names near X: ...': close spellings, then the children of the longest valid
    prefix of `layer` (the top-level modules if none)."""
    parts = layer.split(".")
    parent = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                   if ".".join(parts[:i]) in names), "")
    depth = parent.count(".") + 1 if parent else 0
    children = [n for n in names if n.count(".") == depth
                and (n.startswith(parent + ".") if parent else True)]
    close = set(difflib.get_close_matches(layer, names, n=6, cutoff=0.6))
    shown = [n for n in names if n in close]
    shown += [n for n in children if n not in close]
    more = ", ..." if len(shown) > _SHOWN else ""
    where = f" (children of {parent!r} included)" if parent else ""
    return (f"valid names near {layer!r}{where}: {', '.join(shown[:_SHOWN])}{more} "
            f"(all names: ldm.extractors.list_layers(spec), or model.named_modules())")


def read_layer(extractor: FeatureExtractor, x: torch.Tensor) -> torch.Tensor:
    """Run `extractor.embed(x)` up to `extractor.layer` and shape that output into a feature."""
    module = find_layer(extractor.layer_root(), extractor.layer, extractor.name)
    captured = []

    def hook(_module, _args, output):
        captured.append(output)
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        extractor.embed(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ExtractorSpecError(
            f"{extractor.name}: layer {extractor.layer!r} is not run by the model's forward "
            "pass (e.g. an auxiliary head used only in training): choose another layer")
    return to_feature(first_tensor(captured[0], extractor), extractor)


def first_tensor(output, extractor: FeatureExtractor) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = next((o for o in output if isinstance(o, torch.Tensor)), None)
    if not isinstance(output, torch.Tensor):
        raise ExtractorSpecError(f"{extractor.name}: layer {extractor.layer!r} outputs "
                                 f"{type(output).__name__}, not a tensor: choose another layer")
    return output


def to_feature(out: torch.Tensor, ex: FeatureExtractor) -> torch.Tensor:
    where = f"{ex.name}: layer {ex.layer!r} outputs shape {tuple(out.shape)}"
    readout = ex.readout
    if out.dim() == 4:
        if readout.channels_last:
            out = out.permute(0, 3, 1, 2)
        return out if ex.spatial else out.mean(dim=(2, 3))
    if out.dim() == 3:
        patches = out[:, readout.prefix_tokens:]
        if not ex.spatial:
            return out[:, 0] if readout.class_token else patches.mean(dim=1)
        n = patches.shape[1]
        h, w = readout.token_grid or (math.isqrt(n), math.isqrt(n))
        if h * w != n:
            raise ExtractorSpecError(f"{where}: {n} patch tokens do not form a "
                                     f"{h}x{w} grid, so spatial=True cannot make a map")
        return patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)
    if out.dim() == 2 and not ex.spatial:
        return out
    raise ExtractorSpecError(f"{where}, which has no spatial map: use spatial=False or a "
                             "layer that outputs [B, C, H, W] or tokens [B, N, C]")
