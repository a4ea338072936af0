"""A FeatInv decoder on disk: the ControlNet's weights (`control_model.*`, safetensors) and a
record of what it decodes (extractor, layer, spatial or pooled, hint shape) and of the frozen
base model it steers. The base model's weights stay in their own file, except the UNet's decoder
half when the training tuned it too (`sd_locked` False): the file holds it then, and it
replaces the base model's."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ldm.checkpoint import (SD_V1_IGNORABLE_KEYS, CheckpointError, load_into,
                            load_state_dict)
from ldm.extractors import build_extractor
from ldm.extractors.base import FeatureExtractor
from ldm.files import atomic_write, write_safetensors
from ldm.models.diffusion.controlled_ddpm import (FEATINV_IGNORABLE_KEYS, ControlLDM,
                                                  control_ldm_config, control_state_dict,
                                                  trained_prefixes, trained_state_dict)
from ldm.models.loading import config_source, load_config, read_weights, with_schedule
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
    unconditional base); `extractor_weights`: `build_extractor`'s `weights` (None: default);
    `sd_locked`: the base UNet stayed frozen (False: its decoder half was tuned too, and the
    file holds it).
    """

    extractor: str
    layer: str | None
    spatial: bool
    hint_shape: tuple[int, int, int]
    base_config: str
    hint_hidden_channels: int = 512
    prompt: str | None = None
    extractor_weights: str | None = None
    sd_locked: bool = True

    @property
    def extractor_spec(self) -> str:
        return f"{self.extractor}@{self.layer}" if self.layer else self.extractor

    def build_extractor(self, device="cpu", weights: str | None = None) -> FeatureExtractor:
        """The extractor with the caller's `weights` (None: its default): the record's
        `extractor_weights` only says what the decoder was trained with, it is never opened."""
        return build_extractor(self.extractor_spec, weights=weights, device=device,
                               spatial=self.spatial)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DecoderRecord:
        """The record in `text`, every field checked (type and bounds) before anything is built."""
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise CheckpointError(f"not a {FORMAT} record: {text[:200]!r}")
        return cls(**_checked_record_fields(data))


# field → (types, required); the bounds of the numbers are below
RECORD_FIELDS = {"extractor": (str, True), "layer": ((str, type(None)), True),
                 "spatial": (bool, True), "hint_shape": (list, True), "base_config": (str, True),
                 "hint_hidden_channels": (int, False), "prompt": ((str, type(None)), False),
                 "extractor_weights": ((str, type(None)), False), "sd_locked": (bool, False)}
MAX_HINT_CHANNELS, MAX_HINT_SIDE, MAX_HIDDEN_CHANNELS = 16384, 1024, 4096


def _checked_record_fields(data: dict) -> dict:
    def bad(problem: str):
        return CheckpointError(f"the decoder's record {problem}: the file is damaged or was not "
                               "written by scripts/train_featinv.py")
    unknown = sorted(set(data) - set(RECORD_FIELDS))
    missing = sorted(k for k, (_, required) in RECORD_FIELDS.items() if required and k not in data)
    if unknown or missing:
        raise bad(f"has unknown fields {unknown} or misses {missing}")
    for key, (types, _) in RECORD_FIELDS.items():
        if key in data and type(data[key]) not in (types if isinstance(types, tuple) else (types,)):
            raise bad(f"has {key} {data[key]!r:.100}, of the wrong type")   # JSON's exact types
    shape = data["hint_shape"]
    if (len(shape) != 3 or not all(type(n) is int for n in shape)
            or not (1 <= shape[0] <= MAX_HINT_CHANNELS and all(1 <= n <= MAX_HINT_SIDE for n in shape[1:]))):
        raise bad(f"has hint_shape {shape!r}: 3 integers (C, h, w), C from 1 to {MAX_HINT_CHANNELS}, "
                  f"h and w from 1 to {MAX_HINT_SIDE}")
    hidden = data.get("hint_hidden_channels", 512)
    if not 1 <= hidden <= MAX_HIDDEN_CHANNELS:
        raise bad(f"has hint_hidden_channels {hidden}: from 1 to {MAX_HIDDEN_CHANNELS}")
    return {**data, "hint_shape": tuple(shape)}


def record_config(record: DecoderRecord) -> Path:
    """The record's base config, which must be one of the project's (`configs/...`): a record
    describes the decoder, it never points the loader at a file elsewhere."""
    relative = Path(record.base_config)
    if (relative.is_absolute() or ".." in relative.parts or relative.parts[:1] != ("configs",)
            or not shipped(relative).is_file()):
        raise CheckpointError(f"the decoder was trained on the base config {record.base_config!r}, "
                              "which is not one of this project's configs: give the base model's "
                              "config yourself (--config)")
    return shipped(relative)


def build_decoder_model(record: DecoderRecord, base_config: str | None = None) -> ControlLDM:
    """The ControlLDM of `record` on `base_config` (None: the record's, one of the project's
    configs), freshly initialised."""
    config = load_config(base_config or record_config(record))
    return instantiate_from_config(control_ldm_config(
        config.model, record.hint_shape[0], record.hint_hidden_channels))


def new_decoder(record: DecoderRecord, base_ckpt: str | Path, base_config: str | Path) -> ControlLDM:
    """A decoder to train: the base model (`base_config`, its weights loaded strictly), the
    ControlNet copied from its UNet, the hint block random and the zero convolutions at zero."""
    model = build_decoder_model(record, config_source(base_config, base_ckpt))
    base = with_schedule(model, read_weights(base_ckpt))
    load_into(model, {**base, **control_state_dict(model)}, ignorable=SD_V1_IGNORABLE_KEYS,
              expected=f"the base model of {record.base_config}")
    model.init_control_from_unet()
    return model


def save_decoder(model: ControlLDM, record: DecoderRecord, path: str | Path,
                 dtype: torch.dtype = torch.float32,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
    """The trained weights (as `dtype`; the ControlNet's, and unlocked the UNet's decoder
    half) and the record, as one safetensors file; `weights`: other tensors of the same keys to
    write instead of the model's (a training's EMA)."""
    weights = trained_state_dict(model, record.sd_locked) if weights is None else weights
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in weights.items()}
    atomic_write(Path(path), lambda tmp: write_safetensors(tmp, tensors, {METADATA_KEY: record.to_json()}))


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
    """A trained decoder, ready to sample: its base model from `base_ckpt` and what the training
    trained from `path` (the ControlNet; unlocked, the UNet's decoder half over the base's), all
    loaded strictly. `base_config` overrides the record's (e.g. a moved file); a diffusers
    folder as `base_ckpt` brings its own config."""
    record = read_record(path)
    trained = load_state_dict(path)
    held = _trained_tensors(record.sd_locked)
    foreign = sorted(k for k in trained if not k.startswith(trained_prefixes(record.sd_locked)))
    if foreign:
        raise CheckpointError(f"{path}: a FeatInv decoder file holds {held} only, but this one "
                              f"also holds {len(foreign)} others ({', '.join(foreign[:3])}, ...); "
                              "the base model's weights come from --ckpt alone: use the decoder "
                              "file train_featinv.py wrote")
    model = build_decoder_model(record, config_source(base_config, base_ckpt))
    missing = sorted(trained_state_dict(model, record.sd_locked).keys() - trained.keys())
    if missing:
        raise CheckpointError(f"{path}: its record says it holds {held}, but {len(missing)} of "
                              f"them are missing ({', '.join(missing[:3])}, ...): the file is "
                              "damaged or was not written by scripts/train_featinv.py")
    state = {**with_schedule(model, read_weights(base_ckpt)), **trained}
    load_into(model, state, ignorable=SD_V1_IGNORABLE_KEYS, expected=f"the decoder {path}")
    return model.to(device), record


def _trained_tensors(sd_locked: bool) -> str:
    """What a decoder file of `sd_locked` holds, in words."""
    keys = ", ".join(f"{prefix}*" for prefix in trained_prefixes(sd_locked))
    return (f"the ControlNet's tensors ({keys})" if sd_locked else
            f"the ControlNet's and the UNet decoder half's tensors ({keys})")


def load_featinv_checkpoint(model: ControlLDM, path: str | Path) -> list[str]:
    """Strictly load a whole checkpoint written by FeatInv's code (`cldm` layout: base model and
    `control_model.*` in one file) into `model`; → the harmless extras dropped."""
    return load_into(model, load_state_dict(path), ignorable=FEATINV_IGNORABLE_KEYS,
                     expected="a FeatInv ControlLDM")
