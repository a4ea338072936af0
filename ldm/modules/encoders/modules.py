"""Conditioning encoders.

``FrozenCLIPEmbedder`` is Stable Diffusion v1's text encoder (``cond_stage_model``):
the text tower of OpenAI CLIP ViT-L/14, returning the final-layer-normed hidden
states ``[B, 77, 768]`` that the UNet cross-attends to.  The model is built from
a configuration written here (never downloaded); weights come from the SD
checkpoint (keys ``cond_stage_model.transformer.text_model.*``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, MAX_LENGTH, PAD_TOKEN_ID, build_sd_v1_tokenizer, tokenize

__all__ = ["FrozenCLIPEmbedder", "CLIP_VIT_L14", "SD_V1_TEXT_CONFIG"]

CLIP_VIT_L14 = "openai/clip-vit-large-patch14"

# Text tower of CLIP ViT-L/14 (the values of its Hugging Face text_config).
SD_V1_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    # The real token ids (the hub config carries legacy values 0/2/1; they only
    # affect the pooled output, which SD v1 does not use).
    bos_token_id=BOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
    pad_token_id=PAD_TOKEN_ID,
)


class _TextModelHolder(nn.Module):
    """Gives the text model the parameter path ``text_model.*``.

    transformers 4.x's ``CLIPTextModel`` wrapped its layers in ``.text_model``
    (keys ``text_model.embeddings...``), which is the layout of SD v1
    checkpoints; transformers 5.x's ``CLIPTextModel`` holds the layers directly.
    Holding a 5.x model as ``text_model`` restores the checkpoint layout.
    """

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    @property
    def config(self):
        return self.text_model.config

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.text_model(input_ids=input_ids, **kwargs)


def _make_text_model(overrides: dict[str, Any] | None) -> nn.Module:
    """Build the text transformer; parameters live under ``text_model.``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    kwargs = dict(SD_V1_TEXT_CONFIG)
    attn = "sdpa"
    if overrides:
        overrides = dict(overrides)
        attn = overrides.pop("attn_implementation", attn)
        known = set(CLIPTextConfig().to_dict())
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown CLIP text config field(s) {unknown}")
        kwargs.update(overrides)
    try:
        config = CLIPTextConfig(**kwargs)
    except Exception as exc:  # strict-dataclass validation errors are not ValueErrors
        raise ValueError(f"invalid CLIP text config {kwargs}: {exc}") from exc
    # Set on the config before building the model: works whether or not the
    # config constructor accepts it; the model validates it at construction.
    config._attn_implementation = attn
    model = CLIPTextModel(config)
    if hasattr(model, "text_model"):  # transformers 4.x layout already
        return model
    return _TextModelHolder(model)


class FrozenCLIPEmbedder(nn.Module):
    """SD v1 conditioning encoder: CLIP ViT-L/14 text transformer, frozen.

    Args:
        version: kept for config compatibility with CompVis configs; must be
            ``"openai/clip-vit-large-patch14"`` (nothing is downloaded).
        device: if given, the module is moved there.  Tokens always follow the
            device of the module's parameters.
        max_length: context length (77 for SD v1).
        text_config: overrides of :data:`SD_V1_TEXT_CONFIG` (e.g. tiny test
            models); may include ``attn_implementation`` ("sdpa" by default,
            or "eager").
    """

    def __init__(
        self,
        version: str = CLIP_VIT_L14,
        device: str | torch.device | None = None,
        max_length: int = MAX_LENGTH,
        text_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        if version != CLIP_VIT_L14:
            raise ValueError(
                f"FrozenCLIPEmbedder only supports version={CLIP_VIT_L14!r} (SD v1's text "
                f"encoder, built from an in-code config); got {version!r}"
            )
        self.version = version
        self.max_length = int(max_length)
        self.tokenizer = build_sd_v1_tokenizer()
        self.transformer = _make_text_model(text_config)
        n_pos = self.transformer.config.max_position_embeddings
        if not 2 <= self.max_length <= n_pos:
            raise ValueError(f"max_length={max_length} must be in [2, max_position_embeddings={n_pos}]")
        self.freeze()
        if device is not None:
            self.to(device)

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenCLIPEmbedder":
        # Always stays in eval mode (no dropout etc.), whatever the caller asks.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, text: list[str] | str) -> torch.LongTensor:
        """Token ids ``[B, max_length]`` on the module's device."""
        tokens = tokenize(self.tokenizer, text, max_length=self.max_length)
        vocab_size = self.transformer.config.vocab_size
        if tokens.numel() and int(tokens.max()) >= vocab_size:  # checked on CPU: no sync
            raise ValueError(
                f"token id {int(tokens.max())} out of range for vocab_size={vocab_size}; "
                "the SD v1 tokenizer needs vocab_size >= 49408"
            )
        return tokens.to(self.device)

    def forward(self, text: list[str] | str) -> torch.Tensor:
        """``last_hidden_state`` (after the final layer norm): ``[B, max_length, hidden_size]``."""
        out = self.transformer(input_ids=self.tokenize(text))
        return out.last_hidden_state

    def encode(self, text: list[str] | str) -> torch.Tensor:
        return self(text)
