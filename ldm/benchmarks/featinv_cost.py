"""What training and sampling a FeatInv decoder costs at SD scale, in counted FLOPs (meta device:
no weights, no memory), and the time estimates for ImageNet that follow from them.

    python -m ldm.benchmarks.featinv_cost [--hint 2048 7 7] [--tflops 400]

One training step of one image at FeatInv's 256 px (32x32x4 latents, miniSD = the SD v1
architecture, configs/stable-diffusion/minisd-inference.yaml) and at SD v1's 512 px (64x64x4): the VAE encoder and the extractor without gradients, then the controlled UNet
forward and backward with only the ControlNet trainable (the backward runs through the frozen
UNet's decoder to reach the ControlNet's residuals). Sampling: 50 DDIM steps with classifier-free
guidance (two controlled-UNet evaluations each) and one VAE decode. The extractor is a stand-in
cost (ResNet-50 at 224, counted the same way).
"""
from __future__ import annotations

import argparse
import json

import torch
from torchvision.models import resnet50

from ldm.benchmarks.flops import counted_flops
from ldm.models.diffusion.controlled_ddpm import control_ldm_config
from ldm.models.loading import DEFAULT_CONFIG, load_config
from ldm.util import instantiate_from_config

IMAGENET_IMAGES = 1_281_167
FEATINV_EPOCHS = 3
FEATINV_BATCH = 8


def meta_model(hint: tuple[int, int, int]):
    config = load_config(DEFAULT_CONFIG)
    with torch.device("meta"):
        return instantiate_from_config(control_ldm_config(config.model, hint[0], 512))


def step_flops(model, hint: tuple[int, int, int], latent: int = 32) -> dict:
    """FLOPs of one training image: encoder, extractor, controlled UNet forward + backward."""
    image = torch.zeros(1, 3, latent * 8, latent * 8, device="meta")
    z = torch.zeros(1, 4, latent, latent, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    context = torch.zeros(1, 77, 768, device="meta")
    h = torch.zeros(1, *hint, device="meta")
    model.requires_grad_(False)
    model.control_model.requires_grad_(True)
    extractor = resnet50().to("meta").eval()
    with torch.no_grad():
        encoder = counted_flops(lambda: model.first_stage_model.encode(image))
        feature = counted_flops(lambda: extractor(torch.zeros(1, 3, 224, 224, device="meta")))
    unet = counted_flops(lambda: model.apply_model(z, t, context, hint=h).sum().backward())
    with torch.no_grad():
        unet_forward = counted_flops(lambda: model.apply_model(z, t, context, hint=h))
        decode = counted_flops(lambda: model.decode_first_stage(z))
    return {"vae_encoder": encoder, "extractor": feature, "controlled_unet_fwd_bwd": unet,
            "controlled_unet_fwd": unet_forward, "vae_decoder": decode,
            "train_image": encoder + feature + unet,
            "sample_50_steps_cfg": 50 * 2 * unet_forward + decode}


def estimate(flops: dict, tflops: float) -> dict:
    """Hours for FeatInv's recipe on ImageNet at a sustained `tflops` per GPU."""
    total = flops["train_image"] * IMAGENET_IMAGES * FEATINV_EPOCHS
    hours = total / (tflops * 1e12) / 3600
    return {"train_total_pflop": total / 1e15, "hours_1_gpu": hours, "hours_8_gpus": hours / 8,
            "steps_1_gpu": IMAGENET_IMAGES * FEATINV_EPOCHS // FEATINV_BATCH,
            "sample_seconds_per_image": flops["sample_50_steps_cfg"] / (tflops * 1e12)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hint", type=int, nargs=3, default=[2048, 7, 7],
                        help="the hint's shape C h w (default: ResNet-50 layer4 at 224)")
    parser.add_argument("--tflops", type=float, default=400.0,
                        help="sustained TFLOP/s per GPU of the estimate (default 400: about 40%% of an "
                             "H100's dense bf16 peak)")
    args = parser.parse_args(argv)
    hint = tuple(args.hint)
    model = meta_model(hint)
    out = {"hint": list(hint), "assumed_tflops_per_gpu": args.tflops}
    for pixels in (256, 512):
        flops = step_flops(model, hint, latent=pixels // 8)
        out[f"{pixels}px"] = {"gflop": {k: v / 1e9 for k, v in flops.items()},
                              **estimate(flops, args.tflops)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
