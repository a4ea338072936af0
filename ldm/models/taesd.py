"""A tiny decoder of Stable Diffusion latents in the design of TAESD (madebyollin/taesd).

Guidance backpropagates a feature distance through the decoder at every iteration, and SD's
full VAE decoder is most of that cost. A TAESD-style decoder (about 1.2 M parameters, plain
3x3 convolutions, ReLUs and nearest-neighbour upsampling) maps the same latents to nearly the
same images, so it can carry the guidance gradient while the full decoder still renders the
images that are scored and saved.

Latents and images: TAESD decodes the latents the UNet works in, SD's *scaled* latents
(first-stage latents times `scale_factor`, 0.18215 for SD v1), with no scale factor of its own
(madebyollin/taesd issue #3), into RGB images in about [0, 1]. `TinyFirstStage` maps them to
[-1, 1], so that `TinyFirstStage(decoder)(z)` stands in for `LatentDiffusion.decode_first_stage(z)`.

    decoder = load_taesd_decoder("taesd_decoder.safetensors")   # public SD v1 weights, strict
    decode = TinyFirstStage(decoder)                             # scaled latents -> [-1, 1]

The layers form one `nn.Sequential` whose indices are the key names of the public SD v1 file
("1.weight", "3.conv.0.weight", ..., "19.bias"), so that file loads as it is.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ldm.checkpoint import CheckpointError, load_into, load_state_dict
from ldm.files import atomic_write, write_safetensors

# Safetensors metadata key under which save_taesd_decoder stores the architecture.
_CONFIG_KEY = "taesd_config"


@dataclass(frozen=True)
class TinyDecoderConfig:
    """Architecture of a `TinyDecoder`; the defaults are the public SD v1 decoder's."""

    latent_channels: int = 4
    width: int = 64
    upsamples: int = 3  # 2x stages: 3 for SD v1 (64 -> 512 px), 2 for the toy world (8 -> 32)
    blocks_per_stage: int = 3


SD_V1 = TinyDecoderConfig()
# Sane bounds of each field (a stranger's file must not make us allocate terabytes).
CONFIG_BOUNDS = {"latent_channels": (1, 64), "width": (1, 1024), "upsamples": (0, 6),
                 "blocks_per_stage": (1, 16)}


def checked_config(fields: dict, path) -> TinyDecoderConfig:
    """The TinyDecoderConfig of `fields` (a file's metadata), every field an integer in its
    CONFIG_BOUNDS; CheckpointError naming the first that is not."""
    if not isinstance(fields, dict) or set(fields) - set(CONFIG_BOUNDS):
        raise CheckpointError(f"{path}: the TAESD architecture stored in it is not one: {fields!r:.200} "
                              f"(fields: {', '.join(CONFIG_BOUNDS)})")
    for name, value in fields.items():
        low, high = CONFIG_BOUNDS[name]
        if type(value) is not int or not low <= value <= high:
            raise CheckpointError(f"{path}: the TAESD architecture stored in it has {name} {value!r:.50}, "
                                  f"not an integer from {low} to {high}")
    return TinyDecoderConfig(**fields)


def check_fits(config: TinyDecoderConfig, latent_channels: int, downsample_factor: int, path) -> None:
    """CheckpointError unless a decoder of `config` decodes the model's latents at its image
    size (`latent_channels`, the first stage's `downsample_factor`)."""
    if config.latent_channels != latent_channels or 2 ** config.upsamples != downsample_factor:
        raise CheckpointError(
            f"--gradient_decoder {path} decodes {config.latent_channels}-channel latents with "
            f"{2 ** config.upsamples}x up-sampling, but this model's first stage has {latent_channels} "
            f"channels and down-samples {downsample_factor}x: give the TAESD decoder of this model")


def _conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """3 tanh(x / 3): squashes latents into (-3, 3), nearly the identity near 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * torch.tanh(x / 3)


class ResBlock(nn.Module):
    """relu(x + conv(x)), conv = three 3x3 convolutions with ReLUs between them."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(width, width), nn.ReLU(), _conv3x3(width, width),
                                  nn.ReLU(), _conv3x3(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv(x))


class TinyDecoder(nn.Sequential):
    """Scaled latents [B, C, h, w] -> RGB images [B, 3, h * 2^upsamples, w * 2^upsamples] in
    about [0, 1].

    Soft clamp, 3x3 conv to `width` channels and ReLU; then per stage `blocks_per_stage`
    residual blocks, 2x nearest upsampling and a 3x3 conv without bias; one more residual
    block at full resolution and a 3x3 conv to RGB.
    """

    def __init__(self, config: TinyDecoderConfig = SD_V1):
        width = config.width
        layers = [SoftClamp(), _conv3x3(config.latent_channels, width), nn.ReLU()]
        for _ in range(config.upsamples):
            layers += [ResBlock(width) for _ in range(config.blocks_per_stage)]
            layers += [nn.Upsample(scale_factor=2), _conv3x3(width, width, bias=False)]
        layers += [ResBlock(width), _conv3x3(width, 3)]
        super().__init__(*layers)
        self.config = config


class TinyFirstStage(nn.Module):
    """Drop-in for `LatentDiffusion.decode_first_stage`: the sampler's scaled latents ->
    images in about [-1, 1] (2 * decoder(z) - 1; the decoder's images are in [0, 1])."""

    def __init__(self, decoder: TinyDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z) * 2 - 1


def save_taesd_decoder(decoder: TinyDecoder, path: str | Path) -> None:
    """Weights as safetensors, with the architecture in the metadata (read back by
    `load_taesd_decoder`)."""
    tensors = {k: v.detach().contiguous() for k, v in decoder.state_dict().items()}
    atomic_write(Path(path), lambda tmp: write_safetensors(
        tmp, tensors, {_CONFIG_KEY: json.dumps(asdict(decoder.config))}))


def stored_config(path: str | Path) -> TinyDecoderConfig | None:
    """The architecture that `save_taesd_decoder` wrote into a safetensors file, else None."""
    if Path(path).suffix.lower() != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if _CONFIG_KEY not in metadata:
        return None
    try:
        fields = json.loads(metadata[_CONFIG_KEY])
    except ValueError as err:   # a stranger's file: its metadata is data too
        raise CheckpointError(f"{path}: the TAESD architecture stored in it is unreadable ({err})") from None
    return checked_config(fields, path)


def load_taesd_decoder(path: str | Path, config: TinyDecoderConfig | None = None,
                       device: str | torch.device = "cpu") -> TinyDecoder:
    """A frozen `TinyDecoder` with the weights of `path` (.safetensors, or a .pth/.pt that
    `ldm.checkpoint` reads with `torch.load(weights_only=True)`), loaded strictly.

    `config`: the architecture; None means the one stored in the file by
    `save_taesd_decoder`, else SD v1's (the public `taesd_decoder.pth` / `.safetensors`).
    Keys or shapes that do not fit raise `CheckpointMismatchError` listing the missing,
    unexpected and wrong-shape keys.
    """
    state_dict = load_state_dict(path, missing_hint=f"TAESD decoder weights not found at {path}")
    config = config or stored_config(path) or SD_V1
    decoder = TinyDecoder(config)
    load_into(decoder, state_dict, ignorable=(), expected=f"a TAESD decoder with {config}")
    return decoder.requires_grad_(False).eval().to(device)
