"""ControlNet (Zhang, Rao and Agrawala, "Adding Conditional Control to Text-to-Image Diffusion
Models", 2023) with FeatInv's feature hint block (Neukirch, Vielhaben and Strodthoff, "FeatInv:
Spatially resolved mapping from feature space to input space using conditional diffusion
models", arXiv 2505.21032), in the module tree and state_dict keys of CompVis `cldm`.

The ControlNet is a trainable copy of the UNet's time embedding, input blocks and middle block.
The hint enters once, added after the first input block; every input block's output and the
middle block's output leave through a zero-initialised 1x1 convolution and are added to the
frozen UNet's skip connections and middle block output (13 residuals for SD v1):

    ε(z_t, t, c, hint) = UNet(z_t, t, c; skips_k + Z_k(h_k), mid + Z_mid(h_mid))

At initialisation the zero convolutions make the residuals 0, so the controlled UNet starts as
the base model.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import UNetBlocks, UNetModel, embed_timesteps
from ldm.modules.diffusionmodules.util import zero_module


def zero_conv(channels: int) -> nn.Sequential:
    """1x1 convolution starting at zero (keys `N.0.weight`, `N.0.bias`, as in `cldm`)."""
    return nn.Sequential(zero_module(nn.Conv2d(channels, channels, 1)))


class FeatureHintBlock(nn.Module):
    """FeatInv's hint encoder: a feature map [B, C, h, w] → [B, model_channels, H, W].

    Bilinear upsampling to the latent size H x W, conv3x3 (C → hidden), SiLU, conv3x3
    (hidden → hidden), SiLU, zero-initialised conv3x3 (hidden → model_channels). No timestep
    input. A pooled feature comes as [B, D, 1, 1], which the upsampling copies to every
    position (FeatInv's pooled baseline). FeatInv's width is hidden_channels = 512.
    """

    def __init__(self, hint_channels: int, model_channels: int, hidden_channels: int = 512):
        super().__init__()
        self.block = nn.Sequential(
            # FeatInv's nn.Upsample(size=(32, 32)) sits here; we resize in forward, to the size
            # of the latent at hand, and keep the slot so that the keys are block.1, .3 and .5.
            nn.Identity(),
            nn.Conv2d(hint_channels, hidden_channels, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
            nn.SiLU(),
            zero_module(nn.Conv2d(hidden_channels, model_channels, 3, padding=1)))

    def forward(self, hint: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        hint = F.interpolate(hint, size=tuple(size), mode="bilinear", align_corners=False)
        return self.block(hint)


class ControlNet(nn.Module):
    """The trainable copy of the UNet's encoder, with the hint block and the zero convolutions.

    Takes the UNet's hyper-parameters (without `out_channels`; `options` as in `UNetBlocks`),
    plus `hint_channels` (C of the hint) and `hint_hidden_channels` (the hint block's width).
    """

    OPTIONS_OF = UNetBlocks   # where `options` go (a config's keywords are checked against it)

    def __init__(self, in_channels: int, model_channels: int, hint_channels: int,
                 num_res_blocks: int, attention_resolutions, hint_hidden_channels: int = 512,
                 **options):
        super().__init__()
        blocks = UNetBlocks("ControlNet", model_channels, num_res_blocks, attention_resolutions,
                            **options)
        self.model_channels = model_channels
        self.time_embed = blocks.time_embed()
        self.input_blocks, channels = blocks.input_blocks(in_channels)
        self.zero_convs = nn.ModuleList(zero_conv(ch) for ch in channels)
        self.input_hint_block = FeatureHintBlock(hint_channels, model_channels,
                                                 hint_hidden_channels)
        self.middle_block = blocks.middle_block(channels[-1])
        self.middle_block_out = zero_conv(channels[-1])

    def forward(self, x, hint, timesteps, context=None) -> list[torch.Tensor]:
        """Residuals for the UNet: one per skip connection, in order, then the middle block's."""
        emb = embed_timesteps(self.time_embed, timesteps, self.model_channels, x.dtype)
        residuals = []
        h = x
        for k, (block, out_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, context)
            if k == 0:
                h = h + self.input_hint_block(hint.to(h.dtype), x.shape[-2:])
            residuals.append(out_conv(h))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h))
        return residuals


class ControlledUnetModel(UNetModel):
    """The frozen UNet (same keys as `UNetModel`), taking the ControlNet's residuals."""

    def forward(self, x, timesteps, context=None, control: list[torch.Tensor] | None = None):
        """ε; `control`: `ControlNet.forward`'s residuals (None: the plain UNet)."""
        emb = embed_timesteps(self.time_embed, timesteps, self.model_channels, x.dtype)
        h, skips = self.encode(x, emb, context)
        if control is not None:
            *to_skips, to_middle = control
            h = h + to_middle
            skips = [s + c for s, c in zip(skips, to_skips, strict=True)]
        return self.decode(h, skips, emb, context)
