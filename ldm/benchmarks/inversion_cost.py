"""FLOPs of a whole inversion at SD size, by parts, for the paper's settings and `--preset fast`.

The parts (UNet forward, and forward + backward to its input; the first stage's decoder and
the tiny TAESD-layout decoder, forward and forward + backward; the extractor on the 512x512
image resized to its input, forward and forward + backward) are counted with torch.utils.flop_counter on the meta device
(shapes only: no weights are read and nothing is computed, so ViT-H/14 at 518 counts in
seconds). An iteration is assembled from them as the sampler runs it
(ldm/models/diffusion/feature_guidance.py), and an inversion from the settings' schedule:

- guided iteration: UNet forward + backward (`gradient = unet`; forward only for `z0`), the
  gradient's decoder forward + backward (the full one, or the tiny one), the extractor forward
  + backward, and unless `skip_guided_decode` one more decoder and extractor forward (the
  guided estimate's score);
- unguided step (a timestep `guidance_stride` leaves unguided, fast path only): a UNet forward;
- once per inversion with skipped guided decodes: the last guided estimate's decoder and
  extractor forward (and with a tiny decoder, the kept best image's full decode).

    python -m ldm.benchmarks.inversion_cost      # prints the markdown table of docs/fast-path.md
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from ldm.benchmarks.flops import forward_flops, input_gradient_flops
from ldm.cli.options import preset_options
from ldm.extractors import build_extractor
from ldm.extractors.weights import RANDOM
from ldm.models.diffusion.feature_guidance import GuidanceSettings
from ldm.models.loading import build_model
from ldm.models.taesd import SD_V1, TinyDecoder, TinyFirstStage
from ldm.paths import shipped

SD_CONFIG = shipped("configs/stable-diffusion/v1-inference.yaml")
EXTRACTORS = ("resnet50", "clip_rn50", "vit_h_14")
SIDE = 512
NUM_TIMESTEPS = 1000
SUSTAINED = 0.4 * 989.4e12    # 40 % of an H100's dense bf16 peak, FLOP/s (a projection, not a measurement)


@dataclass(frozen=True)
class Parts:
    """FLOPs of the parts of an iteration (batch 1, 512x512)."""

    unet: float
    unet_backward: float      # forward + backward to the latent
    decoder: float
    decoder_backward: float
    tiny_backward: float
    extractor: float
    extractor_backward: float


def count_parts(extractor: str) -> Parts:
    """The parts for SD v1 at 512x512 with `extractor` (random weights on the meta device)."""
    with torch.device("meta"):
        model = build_model(OmegaConf.load(SD_CONFIG)).requires_grad_(False)
        tiny = TinyFirstStage(TinyDecoder(SD_V1)).requires_grad_(False)
        net = build_extractor(extractor, weights=RANDOM, device="meta").requires_grad_(False)
        z = torch.empty(1, 4, SIDE // 8, SIDE // 8)
        t, cond = torch.full((1,), 500, dtype=torch.long), torch.empty(1, 77, 768)
        side = net.preprocessing.input_size   # the 512x512 image is resized to it (no FLOPs counted)
        image = torch.empty(1, 3, side, side)
    unet = lambda z_, t_, c_: model.apply_model(z_, t_, c_)  # noqa: E731
    return Parts(unet=forward_flops(unet, z, t, cond), unet_backward=input_gradient_flops(unet, z, t, cond),
                 decoder=forward_flops(model.decode_first_stage, z),
                 decoder_backward=input_gradient_flops(model.decode_first_stage, z),
                 tiny_backward=input_gradient_flops(tiny, z),
                 extractor=forward_flops(net.encode, image), extractor_backward=input_gradient_flops(net.encode, image))


def guided_iteration(p: Parts, s: GuidanceSettings, tiny: bool) -> float:
    unet = p.unet_backward if s.gradient == "unet" else p.unet
    decoder = p.tiny_backward if tiny else p.decoder_backward
    scored = 0.0 if s.skip_guided_decode else p.decoder + p.extractor
    return unet + decoder + p.extractor_backward + scored


def inversion(p: Parts, s: GuidanceSettings, tiny: bool) -> dict:
    """Guided iterations, unguided steps and FLOPs of one inversion at `s`."""
    timesteps = s.schedule(NUM_TIMESTEPS)
    n = len(timesteps)
    guided = sum(s.recurrences(timesteps, k) for k in range(n) if s.guided_at(timesteps, k))
    plain = sum(s.recurrences(timesteps, k) for k in range(n) if not s.guided_at(timesteps, k))
    final = (p.decoder + p.extractor) * (s.skip_guided_decode + tiny)
    iteration = guided_iteration(p, s, tiny)
    return {"guided": guided, "plain": plain, "iteration": iteration,
            "flops": guided * iteration + plain * p.unet + final}


def table(extractors=EXTRACTORS) -> str:
    paper, fast = preset_options("paper"), preset_options("fast")
    lines = ["| extractor | paper iteration | fast guided iteration | unguided step | paper run | fast run | ratio | "
             "at 40 % of an H100's bf16 peak: paper / fast |", "|---|---|---|---|---|---|---|---|"]
    for name in extractors:
        parts = count_parts(name)
        a = inversion(parts, paper.settings(), tiny=False)
        b = inversion(parts, fast.settings(), tiny=fast.gradient_decoder is not None)
        lines.append(f"| {name} | {a['iteration'] / 1e12:.3f} TFLOP | {b['iteration'] / 1e12:.3f} TFLOP | "
                     f"{parts.unet / 1e12:.3f} TFLOP | {a['flops'] / 1e15:.1f} PFLOP ({a['guided']:,} it.) | "
                     f"{b['flops'] / 1e15:.3f} PFLOP ({b['guided']} + {b['plain']} it.) | "
                     f"1/{a['flops'] / b['flops']:.0f} | {a['flops'] / SUSTAINED / 60:.1f} min / "
                     f"{b['flops'] / SUSTAINED:.2f} s |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extractors", nargs="+", default=list(EXTRACTORS))
    print(table(ap.parse_args(argv).extractors))


if __name__ == "__main__":
    main()
