"""open_clip models: image and text embeddings in one space. `ClipRN50Extractor` is the
paper's CLIP RN50 (OpenAI weights); `OpenClipExtractor("ViT-B-32", "laion2b_s34b_b79k")` any
other open_clip model and pretrained tag.

Layers (`@layer`) name submodules of the image tower `model.visual` (e.g. `layer3` of RN50,
`transformer.resblocks.6` of a ViT, whose tokens start with one class token). A layer's feature
is not in the text space, so text targets need the default feature.

open_clip (which imports transformers, ~2 s) is imported only when a CLIP extractor is built.
"""
from __future__ import annotations

import difflib
import logging
import warnings

import torch
from torchvision.transforms import InterpolationMode

from ldm.extractors.base import FeatureExtractor
from ldm.extractors.errors import ExtractorSpecError
from ldm.extractors.preprocessing import Preprocessing, Readout
from ldm.extractors.weights import (OPENAI_CLIP_EXTRA_KEYS, build_model, weights_kind,
                                    open_clip_source)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TORCHSCRIPT_HINT = (
    "OpenAI's original RN50.pt is such an archive. Use open_clip's state-dict file instead "
    "(open_clip_model.safetensors or open_clip_pytorch_model.bin from "
    "https://huggingface.co/timm/resnet50_clip.openai), or, if you trust the file, convert it "
    "once: python -c \"import torch, safetensors.torch as st; "
    "sd = torch.jit.load('RN50.pt', map_location='cpu').state_dict(); "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'RN50-openai.safetensors')\"")


def open_clip_tag(model_name: str, weights, file_tag: str | None = None) -> str:
    """The pretrained tag meant by `weights` (a tag; for a file, `file_tag` or the default;
    the default: "openai" if the model has it, else its first tag), checked against open_clip's
    list."""
    import open_clip
    if model_name not in open_clip.list_models():
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=6, cutoff=0.5)
        raise ExtractorSpecError(
            f"open_clip has no model {model_name!r}"
            + (f"; close matches: {', '.join(close)}" if close else "")
            + " (all of them: open_clip.list_models())")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if weights is None and not tags:
        raise ExtractorSpecError(f"open_clip:{model_name} has no pretrained weights: pass a local "
                                 "file, or \"random\"")
    tag = str(weights) if weights_kind(weights) == "tag" else file_tag
    if tag is None:
        return "openai" if "openai" in tags else (tags[0] if tags else "")
    if tag not in tags:
        raise ExtractorSpecError(f"open_clip:{model_name} has no pretrained tag {tag!r}; its "
                                 f"tags: {', '.join(tags) or 'none'} (or \"random\", or a local file)")
    return tag


class OpenClipExtractor(FeatureExtractor):
    """An open_clip model with one of its pretrained tags.

    - `encode`: `encode_image`, the projected image embedding, not L2-normalised.
    - `encode_text`: the model's tokenizer and `encode_text`, the projected text embedding, not
      L2-normalised; longer prompts than the context are truncated with a warning.
    - Runs in float32.
    - Preprocessing: the tag's (mean, std, interpolation, resize mode), at the image tower's size.

    `weights`: None (the tag's weights from the Hugging Face cache, the drop-in folder or a
    download, see `ldm.extractors.weights.open_clip_source`), a pretrained tag, "random" (random
    init, nothing read) or a local file in open_clip's state_dict layout (safe loader).
    """

    model_name: str = ""
    pretrained_tag: str = ""
    tokenizer = None  # loaded on first use (some tokenizers come from the Hugging Face Hub)
    preprocessing = Preprocessing(generated="target")

    def __init__(self, model_name: str | None = None, weights: str | None = None, device="cpu",
                 *, layer: str | None = None, spatial: bool = False, tag: str | None = None):
        super().__init__()
        import open_clip
        self.model_name = model_name or self.model_name
        self.pretrained_tag = open_clip_tag(self.model_name, weights, tag)
        self.weights_tag = self.pretrained_tag or None
        if type(self) is OpenClipExtractor:
            self.name = f"open_clip:{self.model_name}"
        cfg = open_clip.get_pretrained_cfg(self.model_name, self.pretrained_tag) or {}
        tag = f"(pretrained={self.pretrained_tag!r})" if self.pretrained_tag else ""

        def check(skeleton):
            self.model = skeleton  # layer names are checked before any weights are read
            self.set_layer(layer, spatial)

        self.model = build_model(
            lambda: self.architecture(cfg), weights,
            lambda: open_clip_source(self.model_name, self.pretrained_tag), device=device,
            check=check, heads=(), ignorable=OPENAI_CLIP_EXTRA_KEYS,
            torchscript_hint=TORCHSCRIPT_HINT, expected=f"open_clip {self.model_name} {tag}")
        self.freeze()
        self.preprocessing = self.tag_preprocessing(cfg)
        if getattr(self.model.visual, "class_embedding", None) is not None:  # ViT towers
            self.readout = Readout(prefix_tokens=1, class_token=True)
        self.to(device)

    def tag_preprocessing(self, cfg: dict) -> Preprocessing:
        """The tag's mean, std, interpolation and resize mode at the image tower's size."""
        base = type(self).preprocessing
        size = getattr(self.model.visual, "image_size", base.input_size)
        return Preprocessing(
            input_size=int(size[0] if isinstance(size, (tuple, list)) else size),
            interpolation=InterpolationMode(cfg.get("interpolation", "bicubic")),
            resize_mode="squash" if cfg.get("resize_mode") == "squash" else "shorter",
            mean=tuple(cfg.get("mean", base.mean)), std=tuple(cfg.get("std", base.std)),
            generated=base.generated)

    def architecture(self, cfg: dict) -> torch.nn.Module:
        """open_clip's model, random init, QuickGELU if the tag was trained with it."""
        import open_clip
        root = logging.getLogger()  # open_clip warns there that the model is random: it is meant
        quiet = lambda record: "No pretrained weights loaded" not in record.getMessage()  # noqa: E731
        root.addFilter(quiet)
        try:
            return open_clip.create_model(self.model_name, pretrained=None,
                                          force_quick_gelu=bool(cfg.get("quick_gelu")))
        finally:
            root.removeFilter(quiet)

    def layer_root(self) -> torch.nn.Module:
        return self.model.visual

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, normalize=False)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        if not self.supports_text():
            return super().encode_text(prompts)  # TextTargetNotSupported: a layer's feature
        if self.tokenizer is None:
            import open_clip
            self.tokenizer = open_clip.get_tokenizer(self.model_name)
        if isinstance(prompts, str):
            prompts = [prompts]
        limit = self.tokenizer.context_length
        for prompt in prompts:
            count = len(self.tokenizer.encode(prompt)) + 2  # + start and end tokens
            if count > limit:
                warnings.warn(f"text prompt of {count} tokens (with start/end tokens) is longer "
                              f"than CLIP's limit of {limit}: it was truncated to {limit} tokens: "
                              f"{prompt[:60]!r}...", stacklevel=2)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens, normalize=False)


class ClipRN50Extractor(OpenClipExtractor):
    """open_clip `RN50` with OpenAI's weights (`pretrained='openai'`, QuickGELU text tower).

    - `encode`: `encode_image`, the 1024-d attention-pool projection, not L2-normalised.
    - `encode_text`: open_clip's RN50 tokenizer (77 tokens, longer prompts are truncated with a
      warning) and `encode_text`, the 1024-d projected end-of-text token, not L2-normalised.
    - Runs in float32. The reference ran CLIP in float16 on CUDA (OpenAI's `clip.load`), so
      features differ from the reference's at fp16 precision.
    - Preprocessing: resize the shorter side to 224 bicubic, centre crop 224, OpenAI mean/std,
      the same tensors as open_clip's own preprocess for these weights.

    `weights`: a local file in open_clip's state_dict layout, e.g. `open_clip_model.safetensors`
    or `open_clip_pytorch_model.bin` of https://huggingface.co/timm/resnet50_clip.openai (a
    state_dict taken from OpenAI's TorchScript model loads too: its `input_resolution`,
    `context_length` and `vocab_size` entries are dropped; fp16 tensors are cast to fp32).
    OpenAI's original `RN50.pt` itself is a TorchScript archive and is refused by the safe
    loader, with instructions to convert it. Without `weights`, the Hugging Face cache and
    `~/.cache/clip/timm/resnet50_clip.openai/` are searched, then open_clip downloads the file.
    "random": random init (tests, timing).
    """

    name = "clip_rn50"
    preprocessing = Preprocessing(input_size=224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    model_name = "RN50"
    pretrained_tag = "openai"

    def __init__(self, weights: str | None = None, device="cpu", *, layer: str | None = None,
                 spatial: bool = False):
        if weights_kind(weights) == "tag" and weights != self.pretrained_tag:
            raise ExtractorSpecError(
                f"ClipRN50Extractor uses OpenAI's weights; for {weights!r} use "
                f"build_extractor('open_clip:RN50', weights={weights!r})")
        super().__init__(self.model_name, weights, device, layer=layer, spatial=spatial)
        import open_clip
        self.tokenizer = open_clip.get_tokenizer(self.model_name)

    @classmethod
    def architecture(cls, cfg: dict | None = None) -> torch.nn.Module:
        """open_clip's RN50 `CLIP`, random init, QuickGELU as OpenAI trained it (what open_clip's
        'RN50-quickgelu' config and `create_model('RN50', pretrained='openai')` build)."""
        import open_clip
        from open_clip.model import CLIP
        config = open_clip.get_model_config(cls.model_name)
        return CLIP(**{**config, "quick_gelu": True})
