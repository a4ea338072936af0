"""The KL-regularised autoencoder that maps images to SD latents and back."""
import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    """Encoder → quant_conv → diagonal Gaussian; post_quant_conv → decoder.

    `lossconfig` and `monitor` are training settings of the original configs: accepted so those
    configs load, and unused here (this package does inference only).
    """

    def __init__(self, ddconfig: dict, embed_dim: int, lossconfig: dict | None = None,
                 monitor: str | None = None):
        super().__init__()
        del lossconfig, monitor
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (mean and log-variance)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        # Spatial down-sampling factor between images and latents.
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
