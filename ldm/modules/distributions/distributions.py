import torch


class DiagonalGaussianDistribution:
    """The first stage's posterior: `parameters` holds mean and log-variance along dim 1."""

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over all but the batch dimension."""
        return 0.5 * torch.sum(self.mean ** 2 + self.std ** 2 - 1.0 - self.logvar, dim=[1, 2, 3])
