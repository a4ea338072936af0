"""A FeatInv decoder on disk: the ControlNet's weights (`control_model.*`, safetensors) and a
record of what it decodes (extractor, layer, spatial or pooled, hint shape) and of the frozen
base model it steers. The base model's weights stay in their own file."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.checkpoint import (SD_V1_IGNORABLE_KEYS, CheckpointError, load_into,
                            load_state_dict)
from ldm.extractors import build_extractor
from ldm.extractors.base import FeatureExtractor
from ldm.models.diffusion.controlled_ddpm import (FEATINV_IGNORABLE_KEYS, ControlLDM,
                                                  control_ldm_config, control_state_dict)
from ldm.models.loading import load_config
from ldm.paths import shipped
from ldm.util import instantiate_from_config

METADATA_KEY = "featinv"
FORMAT = "featinv-controlnet/1"
# FeatInv's fixed prompt (the unconditional branch of guidance gets "").
FEATINV_PROMPT = "a high-quality, detailed, and professional image"


class ResumeMismatchError(ValueError):
    """--resume of a training checkpoint written for another decoder (another record)."""


@dataclass(frozen=True)
class DecoderRecord:
    """What a decoder decodes and what it steers, stored in its safetensors metadata.

    `extractor`: the registry spec without the layer (`toy:all`, `torchvision:resnet50`);
    `layer`: the layer read (None: the default feature); `spatial`: the layer's map, else the
    pooled vector broadcast to every position; `hint_shape`: (C, h, w) of one hint;
    `base_config`: the frozen base model's config; `prompt`: the training prompt (None for an
    unconditional base); `extractor_weights`: `build_extractor`'s `weights` (None: default).
    """

    extractor: str
    layer: str | None
    spatial: bool
    hint_shape: tuple[int, int, int]
    base_config: str
    hint_hidden_channels: int = 512
    prompt: str | None = None
    extractor_weights: str | None = None

    @property
    def extractor_spec(self) -> str:
        return f"{self.extractor}@{self.layer}" if self.layer else self.extractor

    def build_extractor(self, device="cpu") -> FeatureExtractor:
        return build_extractor(self.extractor_spec, weights=self.extractor_weights,
                               device=device, spatial=self.spatial)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DecoderRecord:
        data = json.loads(text)
        if data.pop("format", None) != FORMAT:
            raise CheckpointError(f"not a {FORMAT} record: {text[:200]}")
        return cls(**{**data, "hint_shape": tuple(data["hint_shape"])})


def build_decoder_model(record: DecoderRecord, base_config: str | None = None) -> ControlLDM:
    """The ControlLDM of `record` on its base config (or `base_config`), freshly initialised."""
    config = load_config(base_config or shipped(record.base_config))   # relative: the project's
    return instantiate_from_config(control_ldm_config(
        config.model, record.hint_shape[0], record.hint_hidden_channels))


def new_decoder(record: DecoderRecord, base_ckpt: str | Path) -> ControlLDM:
    """A decoder to train: the base model's weights loaded (strictly), the ControlNet copied
    from its UNet, the hint block random and the zero convolutions at zero."""
    model = build_decoder_model(record)
    base = load_state_dict(base_ckpt)
    load_into(model, {**base, **control_state_dict(model)}, ignorable=SD_V1_IGNORABLE_KEYS,
              expected=f"the base model of {record.base_config}")
    model.init_control_from_unet()
    return model


def save_decoder(model: ControlLDM, record: DecoderRecord, path: str | Path,
                 dtype: torch.dtype = torch.float32,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
    """The ControlNet's weights (as `dtype`) and the record, as one safetensors file; `weights`:
    other `control_model.*` tensors to write instead of the model's (a training's EMA)."""
    weights = control_state_dict(model) if weights is None else weights
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in weights.items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: record.to_json()})
    os.chmod(path, 0o644)


def read_record(path: str | Path) -> DecoderRecord:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # missing, truncated or not safetensors
        raise CheckpointError(f"{path}: not a readable FeatInv decoder ({e})") from e
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path}: no FeatInv decoder record in its metadata")
    return DecoderRecord.from_json(metadata[METADATA_KEY])


def load_decoder(path: str | Path, base_ckpt: str | Path, base_config: str | None = None,
                 device="cpu") -> tuple[ControlLDM, DecoderRecord]:
    """A trained decoder, ready to sample: its base model from `base_ckpt` and its ControlNet
    from `path`, both loaded strictly. `base_config` overrides the record's (e.g. a moved file)."""
    record = read_record(path)
    model = build_decoder_model(record, base_config)
    state = {**load_state_dict(base_ckpt), **load_state_dict(path)}
    load_into(model, state, ignorable=SD_V1_IGNORABLE_KEYS, expected=f"the decoder {path}")
    return model.to(device), record


def load_featinv_checkpoint(model: ControlLDM, path: str | Path) -> list[str]:
    """Strictly load a whole checkpoint written by FeatInv's code (`cldm` layout: base model and
    `control_model.*` in one file) into `model`; → the harmless extras dropped."""
    return load_into(model, load_state_dict(path), ignorable=FEATINV_IGNORABLE_KEYS,
                     expected="a FeatInv ControlLDM")
