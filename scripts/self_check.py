"""Self-check: build a tiny model with the SD v1 module tree, decode a random target feature of
a tiny extractor with and without guidance, and report what happened. No weights, no network."""
import time

import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.extractors.base import FeatureDistance, FeatureExtractor
from ldm.models.diffusion.feature_guidance import GuidanceSettings, sample_feature_guided
from ldm.models.loading import build_model
from ldm.util import count_params


class TinyExtractor(FeatureExtractor):
    name, input_size = "tiny-cnn", 16

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.freeze()

    def encode(self, x):
        return self.net(x)


def main():
    torch.manual_seed(0)
    config = OmegaConf.load("configs/tiny/sd-v1-tiny.yaml")
    config.model.params.timesteps = 50
    model = build_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 and not name.startswith("cond_stage_model"):
                p.normal_(0, 0.1)
    print(f"tiny SD-v1-shaped model: UNet {count_params(model.model):,} params, "
          f"VAE {count_params(model.first_stage_model):,}, text encoder "
          f"{count_params(model.cond_stage_model):,}; {model.num_timesteps} timesteps")
    extractor = TinyExtractor()
    target = extractor(torch.rand(1, 3, 16, 16) * 2 - 1).detach() * 3
    objective = FeatureDistance(extractor, target)
    cond = model.get_learned_conditioning([""])
    for guided in (False, True):
        settings = GuidanceSettings(forward_guidance=guided, forward_guidance_wt=4.0,
                                    grad_clip_threshold=3.0, num_steps=(2,))
        start = time.perf_counter()
        result = sample_feature_guided(model, cond, objective, settings, (1, 4, 8, 8),
                                       [torch.Generator().manual_seed(0)], progress=False)
        print(f"{'guided  ' if guided else 'unguided'}: {result.iterations} iterations in "
              f"{time.perf_counter() - start:.1f} s, final squared distance "
              f"{result.final_distance.item():.4f}, cosine {result.final_cosine.item():.4f}")
    print("self-check passed")


if __name__ == "__main__":
    main()
