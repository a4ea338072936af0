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


def embed_timesteps(time_embed: nn.Module, timesteps: torch.Tensor, width: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The time embedding: the MLP `time_embed` of the sinusoidal embedding of `timesteps`."""
    return time_embed(timestep_embedding(timesteps, width).to(dtype))


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


class UNetBlocks:
    """Builds the SD v1 UNet's blocks from the CompVis hyper-parameters.

    Shared by `UNetModel` and the ControlNet (`ldm.modules.diffusionmodules.controlnet`), whose
    time embedding, input blocks and middle block are copies of the UNet's: the same code builds
    both, so their state_dict keys and shapes agree by construction. Only the options SD v1 and
    the project's small models use are implemented; the others of the CompVis signature are
    rejected with a clear error rather than silently ignored.
    """

    def __init__(self, owner: str, model_channels: int, num_res_blocks: int,
                 attention_resolutions, channel_mult=(1, 2, 4, 8), dropout: float = 0.0,
                 num_heads: int = -1, num_head_channels: int = -1,
                 use_spatial_transformer: bool = True, transformer_depth: int = 1,
                 context_dim: int | None = None, use_checkpoint: bool = False,
                 legacy: bool = False, image_size: int | None = None, conv_resample: bool = True,
                 dims: int = 2, num_classes=None, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_fp16: bool = False):
        unsupported = {"use_spatial_transformer": (use_spatial_transformer, True),
                       "conv_resample": (conv_resample, True), "dims": (dims, 2),
                       "num_classes": (num_classes, None),
                       "use_scale_shift_norm": (use_scale_shift_norm, False),
                       "resblock_updown": (resblock_updown, False)}
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"{owner}: {name}={value!r} is not supported by this inference "
                                 f"implementation (only {supported!r}, as in SD v1)")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError(f"{owner}: set exactly one of num_heads and num_head_channels")
        # image_size is unused by the network (kept for config compatibility); use_fp16 is replaced
        # by autocast at run time.
        del image_size, use_fp16
        self.model_channels, self.num_res_blocks = model_channels, num_res_blocks
        self.attention_resolutions, self.channel_mult = attention_resolutions, channel_mult
        self.dropout, self.transformer_depth = dropout, transformer_depth
        self.context_dim = context_dim
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.use_checkpoint, self.legacy = use_checkpoint, legacy
        self.time_dim = model_channels * 4

    def time_embed(self) -> nn.Sequential:
        return nn.Sequential(nn.Linear(self.model_channels, self.time_dim), nn.SiLU(),
                             nn.Linear(self.time_dim, self.time_dim))

    def resblock(self, ch: int, out: int) -> ResBlock:
        return ResBlock(ch, self.time_dim, self.dropout, out_channels=out,
                        use_checkpoint=self.use_checkpoint)

    def attention(self, ch: int) -> SpatialTransformer:
        if self.num_head_channels == -1:
            n_heads, d_head = self.num_heads, ch // self.num_heads
        else:
            n_heads, d_head = ch // self.num_head_channels, self.num_head_channels
        if self.legacy:  # the CompVis "legacy" rule: d_head = ch // num_heads
            d_head = ch // n_heads
        return SpatialTransformer(ch, n_heads, d_head, depth=self.transformer_depth,
                                  dropout=self.dropout, context_dim=self.context_dim,
                                  use_checkpoint=self.use_checkpoint)

    def input_blocks(self, in_channels: int) -> tuple[nn.ModuleList, list[int]]:
        """(the input blocks, the output channels of each: the widths of the skip connections)."""
        width = self.model_channels
        first = TimestepEmbedSequential(nn.Conv2d(in_channels, width, 3, padding=1))
        blocks = nn.ModuleList([first])
        channels = [width]
        ch = width
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers = [self.resblock(ch, mult * width)]
                ch = mult * width
                if 2 ** level in self.attention_resolutions:
                    layers.append(self.attention(ch))
                blocks.append(TimestepEmbedSequential(*layers))
                channels.append(ch)
            if level != len(self.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch)))
                channels.append(ch)
        return blocks, channels

    def middle_block(self, ch: int) -> TimestepEmbedSequential:
        return TimestepEmbedSequential(self.resblock(ch, ch), self.attention(ch),
                                       self.resblock(ch, ch))

    def output_blocks(self, skip_channels: list[int]) -> nn.ModuleList:
        """The decoder's blocks, each taking one skip connection (popped from the end)."""
        skip_channels = list(skip_channels)
        width = self.model_channels
        ch = skip_channels[-1]
        blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                layers = [self.resblock(ch + skip_channels.pop(), width * mult)]
                ch = width * mult
                if 2 ** level in self.attention_resolutions:
                    layers.append(self.attention(ch))
                if level and i == self.num_res_blocks:
                    layers.append(Upsample(ch))
                blocks.append(TimestepEmbedSequential(*layers))
        return blocks


class UNetModel(nn.Module):
    """UNet with spatial transformers at the downsampling rates in `attention_resolutions`.

    `options`: the other hyper-parameters of the CompVis signature (see `UNetBlocks`).
    """

    OPTIONS_OF = UNetBlocks   # where `options` go (a config's keywords are checked against it)

    def __init__(self, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions, **options):
        super().__init__()
        blocks = UNetBlocks("UNetModel", model_channels, num_res_blocks, attention_resolutions,
                            **options)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels
        self.time_embed = blocks.time_embed()
        self.input_blocks, skip_channels = blocks.input_blocks(in_channels)
        self.middle_block = blocks.middle_block(skip_channels[-1])
        self.output_blocks = blocks.output_blocks(skip_channels)
        self.out = nn.Sequential(normalization(model_channels), nn.SiLU(),
                                 zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)))

    def encode(self, x, emb, context=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the middle block's output, the skip connections: each input block's output)."""
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        return self.middle_block(h, emb, context), skips

    def decode(self, h, skips: list[torch.Tensor], emb, context=None) -> torch.Tensor:
        """The output blocks on the middle block's output `h`, taking the skips from the end."""
        skips = list(skips)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def forward(self, x, timesteps, context=None):
        emb = embed_timesteps(self.time_embed, timesteps, self.model_channels, x.dtype)
        h, skips = self.encode(x, emb, context)
        return self.decode(h, skips, emb, context)
