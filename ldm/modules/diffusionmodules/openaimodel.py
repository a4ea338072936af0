"""The SD v1 denoising UNet (ε-prediction), with the CompVis module tree and state_dict keys."""
import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.model import Upsample   # the same 2x nearest + conv as the VAE's
from ldm.modules.diffusionmodules.util import (maybe_checkpoint, normalization, timestep_embedding,
                                               zero_module)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose members get the time embedding and/or the context when they take them."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding (additive, no scale-shift, as in SD v1)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0,
                 out_channels: int | None = None, use_checkpoint: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))
        self.use_checkpoint = use_checkpoint

    def forward(self, x, emb):
        return maybe_checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class UNetModel(nn.Module):
    """UNet with spatial transformers at the downsampling rates in `attention_resolutions`.

    Only the options SD v1 and the project's small models use are implemented; the others of
    the CompVis signature are rejected with a clear error rather than silently ignored.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions, channel_mult=(1, 2, 4, 8),
                 dropout: float = 0.0, num_heads: int = -1, num_head_channels: int = -1,
                 use_spatial_transformer: bool = True, transformer_depth: int = 1,
                 context_dim: int | None = None, use_checkpoint: bool = False, legacy: bool = False,
                 image_size: int | None = None, conv_resample: bool = True, dims: int = 2,
                 num_classes=None, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_fp16: bool = False):
        super().__init__()
        unsupported = {"use_spatial_transformer": (use_spatial_transformer, True),
                       "conv_resample": (conv_resample, True), "dims": (dims, 2),
                       "num_classes": (num_classes, None),
                       "use_scale_shift_norm": (use_scale_shift_norm, False),
                       "resblock_updown": (resblock_updown, False)}
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"UNetModel: {name}={value!r} is not supported by this inference "
                                 f"implementation (only {supported!r}, as in SD v1)")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("UNetModel: set exactly one of num_heads and num_head_channels")
        # image_size is unused by the network (kept for config compatibility); use_fp16 is replaced
        # by autocast at run time.
        del image_size, use_fp16
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels

        def heads_for(ch):
            if num_head_channels == -1:
                return num_heads, ch // num_heads
            return ch // num_head_channels, num_head_channels

        def attention(ch):
            n_heads, d_head = heads_for(ch)
            if legacy:  # the CompVis "legacy" rule: d_head = ch // num_heads
                d_head = ch // n_heads
            return SpatialTransformer(ch, n_heads, d_head, depth=transformer_depth, dropout=dropout,
                                      context_dim=context_dim, use_checkpoint=use_checkpoint)

        def resblock(ch, out):
            return ResBlock(ch, time_dim, dropout, out_channels=out, use_checkpoint=use_checkpoint)

        time_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_dim), nn.SiLU(),
                                        nn.Linear(time_dim, time_dim))

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)))

    def forward(self, x, timesteps, context=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
