"""Any timm model: `TimmExtractor("resnet18.a1_in1k")` or `TimmExtractor("resnet18", "a1_in1k")`.

The feature is the pooled pre-classifier embedding, `forward_head(forward_features(x),
pre_logits=True)`. Preprocessing comes from the model's pretrained config (through
`timm.data.resolve_data_config`): input size, interpolation, crop_pct (the target is resized to
input_size / crop_pct, then centre-cropped), crop mode, mean and std. Layer outputs are read as
timm lays them out: `num_prefix_tokens` (class and register tokens) before the patch tokens, a
class token if the model has `cls_token`, [B, H, W, C] maps if `output_fmt` is NHWC (Swin).

`weights`: None (the tag's weights, or the model's default tag: Hugging Face cache, drop-in
folder or download, see `ldm.extractors.weights.timm_source`), a pretrained tag ("a1_in1k"),
"random" (timm's random init, nothing read) or a local file of the model's state_dict (with or
without the classifier's keys; a checkpoint in the model family's original layout is converted
by timm's `checkpoint_filter_fn` when the keys do not fit), read by the safe loader.
"""
from __future__ import annotations

import difflib
import math
import sys

import torch
from torchvision.transforms import InterpolationMode

from ldm.extractors.base import FeatureExtractor
from ldm.extractors.errors import ExtractorSpecError
from ldm.extractors.preprocessing import Preprocessing, Readout
from ldm.extractors.weights import build_model, timm_source, weights_kind

_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                   "nearest": InterpolationMode.NEAREST, "lanczos": InterpolationMode.LANCZOS,
                   "box": InterpolationMode.BOX, "hamming": InterpolationMode.HAMMING}


def timm_model_name(model: str, weights, file_tag: str | None = None) -> str:
    """"arch" or "arch.tag", checked against timm's registry; a tag given as `weights` (or, for
    a local file, `file_tag`: the tag it holds) is appended (or must agree with the one in
    `model`)."""
    import timm
    arch, _, tag = model.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=6, cutoff=0.5)
        raise ExtractorSpecError(
            f"timm has no model {arch!r}" + (f"; close matches: {', '.join(close)}" if close else "")
            + " (all of them: timm.list_models())")
    given = str(weights) if weights_kind(weights) == "tag" else file_tag
    if given is not None:
        if tag and tag != given:
            raise ExtractorSpecError(f"timm:{model} names the tag {tag!r} but the weights are "
                                     f"{given!r}: give the tag once")
        tag = given
    if tag and f"{arch}.{tag}" not in timm.list_pretrained(f"{arch}.*"):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise ExtractorSpecError(f"timm:{arch} has no pretrained tag {tag!r}; its tags: "
                                 f"{', '.join(tags) or 'none'} (or \"random\", or a local file)")
    return f"{arch}.{tag}" if tag else arch


class TimmExtractor(FeatureExtractor):
    def __init__(self, model: str, weights: str | None = None, device="cpu", *,
                 layer: str | None = None, spatial: bool = False, tag: str | None = None):
        super().__init__()
        import timm
        full_name = timm_model_name(model, weights, tag)
        self.name = f"timm:{full_name}"
        self.weights_tag = full_name.partition(".")[2] or None

        def check(skeleton: torch.nn.Module):
            self.model = skeleton  # layer names are checked before any weights are read
            self.set_layer(layer, spatial)

        def heads(skeleton) -> list[str]:
            head = skeleton.pretrained_cfg.get("classifier")
            names = dict(skeleton.named_modules())
            return [h for h in ([head] if isinstance(head, str) else head or []) if h in names]

        def filter_fn(state_dict, skeleton):
            # timm converts original-layout checkpoints with the model module's filter
            fn = getattr(sys.modules[type(skeleton).__module__], "checkpoint_filter_fn", None)
            return fn(state_dict, skeleton) if fn else state_dict

        factory = lambda: timm.create_model(full_name, pretrained=False)  # noqa: E731
        self.model = build_model(
            factory, weights, lambda: timm_source(self.model.pretrained_cfg), device=device,
            check=check, heads=heads, filter_fn=filter_fn, expected=f"timm {full_name}")
        self.freeze()
        self.preprocessing = self.data_config_preprocessing(timm.data.resolve_data_config(model=self.model))
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        self.readout = Readout(
            prefix_tokens=int(getattr(self.model, "num_prefix_tokens", 0) or 0),
            class_token=getattr(self.model, "cls_token", None) is not None,
            channels_last=str(getattr(self.model, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC"),
            token_grid=tuple(grid) if grid is not None else None)
        self.to(device)

    def data_config_preprocessing(self, config: dict) -> Preprocessing:
        _, h, w = config["input_size"]
        if h != w:
            raise ExtractorSpecError(f"{self.name}: input size {h}x{w} is not square, which the "
                                     "decoder does not support")
        return Preprocessing(
            input_size=h, resize_size=math.floor(h / config.get("crop_pct", 1.0)),
            interpolation=_INTERPOLATIONS.get(config.get("interpolation"), InterpolationMode.BICUBIC),
            resize_mode="squash" if config.get("crop_mode") == "squash" else "shorter",
            mean=tuple(config["mean"]), std=tuple(config["std"]), generated="target")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
