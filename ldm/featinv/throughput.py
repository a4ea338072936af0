"""Training throughput of a FeatInv decoder on a device (the GPU check's training item): images/s
of whole training steps (VAE encoding, the controlled UNet forward and backward with only the
ControlNet trainable, AdamW) at FeatInv's 256 px on miniSD's architecture with random weights,
and the peak memory. The hint (ResNet-50 layer4's 2048x7x7) and the prompt's context are random
tensors: the extractor's cost is the data loader's side."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.featinv.lightning_module import draw_timesteps
from ldm.models.diffusion.controlled_ddpm import control_ldm_config
from ldm.paths import shipped
from ldm.util import instantiate_from_config

MINISD_CONFIG = shipped("configs/stable-diffusion/minisd-inference.yaml")
HINT = (2048, 7, 7)


def build_featinv(config_path: str | Path, device, hint_channels: int):
    """A ControlLDM of `config_path` with random weights, without its text encoder; → (model,
    the width of the context its UNet attends to, None if unconditional)."""
    config = OmegaConf.load(config_path)
    params = config.model.params
    params.cond_stage_config = "__is_unconditional__"
    with torch.device(device):
        model = instantiate_from_config(control_ldm_config(config.model, hint_channels, 512))
    model.requires_grad_(False)
    model.control_model.requires_grad_(True)
    return model, params.unet_config.params.get("context_dim") if params.get("conditioning_key") else None


def measure(model, context_dim: int | None, batch: int, device, dtype: torch.dtype, steps: int,
            hint=HINT) -> dict:
    """Images/s over `steps` timed training steps (after one untimed), and the peak memory."""
    pixels = model.image_size * model.latent_downsample_factor
    optimizer = torch.optim.AdamW(model.control_model.parameters(), lr=1e-5)
    images = torch.rand(batch, 3, pixels, pixels, device=device) * 2 - 1
    hints = torch.randn(batch, *hint, device=device)
    context = None if context_dim is None else torch.randn(batch, 77, context_dim, device=device)

    def step():
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                z0 = model.get_first_stage_encoding(model.encode_first_stage(images))
            t = draw_timesteps(batch, model.num_timesteps, "uniform", device)
            noise = torch.randn_like(z0)
            eps = model.apply_model(model.q_sample(z0, t, noise), t, context, hints)
            loss = F.mse_loss(eps.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    on_cuda = torch.device(device).type == "cuda"
    step()
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if on_cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if on_cuda else None
    return {"pixels": pixels, "batch": batch, "precision": str(dtype).removeprefix("torch."),
            "s_per_step": seconds, "images_per_s": batch / seconds, "peak_gib": peak}


def training_throughput(device, quick: bool) -> list[dict]:
    """miniSD at 256 px, bf16, batch 8 and 32 (FeatInv's batch is 8 per GPU); --quick (CPU):
    the tiny SD stand-in at fp32, batch 1, one step."""
    from ldm.models.tiny_sd import TINY_CONFIG

    config, grid = ((TINY_CONFIG, [(1, torch.float32)]) if quick
                    else (MINISD_CONFIG, [(8, torch.bfloat16), (32, torch.bfloat16)]))
    hint = (16, 3, 3) if quick else HINT
    model, context_dim = build_featinv(config, device, hint[0])
    records = []
    for batch, dtype in grid:
        try:
            records.append(measure(model, context_dim, batch, device, dtype, 1 if quick else 5,
                                   hint))
        except torch.OutOfMemoryError:
            records.append({"batch": batch, "error": "out of memory"})
    return records


def markdown_table(records: list[dict]) -> str:
    lines = ["", "## FeatInv training", "", "| px | batch | precision | s/step | images/s | peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| | {r['batch']} | | {r['error']} | | |")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['pixels']} | {r['batch']} | {r['precision']} | {r['s_per_step']:.3f} | "
                     f"{r['images_per_s']:.1f} | {peak} |")
    return "\n".join(lines) + "\n"
