"""CLIP RN50 (OpenAI weights, via open_clip): image and text embeddings in one space.

open_clip (which imports transformers, ~2 s) is imported only when a CLIP extractor is built.
"""
from __future__ import annotations

import warnings

import torch

from ldm.checkpoint import load_into
from ldm.extractors.base import FeatureExtractor
from ldm.extractors.weights import (OPENAI_CLIP_EXTRA_KEYS, load_weights_file, open_clip_source,
                                    resolve)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TORCHSCRIPT_HINT = (
    "OpenAI's original RN50.pt is such an archive. Use open_clip's state-dict file instead "
    "(open_clip_model.safetensors or open_clip_pytorch_model.bin from "
    "https://huggingface.co/timm/resnet50_clip.openai), or, if you trust the file, convert it "
    "once: python -c \"import torch, safetensors.torch as st; "
    "sd = torch.jit.load('RN50.pt', map_location='cpu').state_dict(); "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'RN50-openai.safetensors')\"")


class ClipRN50Extractor(FeatureExtractor):
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
    """

    name = "clip_rn50"
    input_size = 224
    mean = OPENAI_CLIP_MEAN
    std = OPENAI_CLIP_STD
    log_cosine = True
    feature_dim = 1024
    model_name = "RN50"
    pretrained_tag = "openai"

    def __init__(self, weights: str | None = None, device="cpu"):
        super().__init__()
        if weights is not None:
            state_dict = load_weights_file(weights, torchscript_hint=TORCHSCRIPT_HINT)
        else:
            state_dict = resolve(open_clip_source(self.model_name, self.pretrained_tag))
        model = self.architecture()
        load_into(model, state_dict, ignorable=OPENAI_CLIP_EXTRA_KEYS,
                  expected=f"open_clip {self.model_name} (pretrained={self.pretrained_tag!r})")
        self.model = model
        import open_clip
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        self.freeze()
        self.to(device)

    @classmethod
    def architecture(cls) -> torch.nn.Module:
        """open_clip's RN50 `CLIP`, random init, QuickGELU as OpenAI trained it (what open_clip's
        'RN50-quickgelu' config and `create_model('RN50', pretrained='openai')` build)."""
        import open_clip
        from open_clip.model import CLIP
        config = open_clip.get_model_config(cls.model_name)
        return CLIP(**{**config, "quick_gelu": True})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, normalize=False)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
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
