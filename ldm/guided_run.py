"""The command line shared by every per-model script (`scripts/*_guided.py`).

A script is its extractor class plus one call: `main(ResNet50Extractor)`. This module parses the
reference's flags, checks them before any model loads, resolves the target (image or text),
runs the guided sampler and writes the outputs the reference writes (`out_img.png`, the best
image, intermediates with `--optim_print`, `log.txt`), plus `metrics.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.utils import save_image

from ldm.checkpoint import CheckpointError
from ldm.extractors.base import FeatureDistance, FeatureExtractor, TextTargetNotSupported, squared_distance
from ldm.models.diffusion.feature_guidance import GuidanceSettings, sample_feature_guided
from ldm.models.loading import (DEFAULT_CKPT, DEFAULT_CONFIG, SD_V14_MISSING_HINT, load_config,
                                load_model)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# Flags the reference parses but never uses: not accepted here (listed in the README).
DROPPED_REFERENCE_FLAGS = (
    "--laion400m", "--fixed_code", "--ddim_eta", "--n_iter", "--C", "--f", "--n_samples", "--steps",
    "--mode", "--epochs", "--save_image_folder", "--optim_mask_type", "--optim_original_conditioning",
    "--optim_do_forward_guidance_norm", "--optim_tv_loss", "--optim_warm_start", "--optim_aug",
    "--optim_mask_fraction", "--text", "--text_type", "--batches",
)


class UsageError(Exception):
    """A problem with the command line or its inputs; printed without a traceback."""


def build_parser(description: str, defaults: dict | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", type=str, default="data/examples/chelsea.jpg",
                   help="target: a path to an image, or a text prompt (text needs a text tower, e.g. CLIP)")
    p.add_argument("--H", type=int, default=512, help="image height in pixels")
    p.add_argument("--W", type=int, default=512, help="image width in pixels")
    p.add_argument("--config", type=str, default=DEFAULT_CONFIG, help="latent diffusion model config")
    p.add_argument("--ckpt", type=str, default=DEFAULT_CKPT, help="latent diffusion checkpoint (.ckpt or .safetensors)")
    p.add_argument("--seed", type=int, default=42, help="random seed (the same seed on the same device gives the same images)")
    p.add_argument("--device", type=str, default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--extractor_weights", type=str, default=None,
                   help="local weights file of the target model (default: the library's download cache)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a folder that holds a finished run")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("guidance (reference --optim_* flags)")
    g.add_argument("--optim_forward_guidance", action="store_true", help="turn on forward guidance")
    g.add_argument("--optim_forward_guidance_wt", type=float, default=5.0, help="guidance weight w_g")
    g.add_argument("--optim_grad_clip_threshold", type=float, default=-1.0,
                   help="clip the rescaled gradient to mean ± thr·std (off when <= 0)")
    g.add_argument("--optim_num_steps", type=int, nargs="+", default=[1],
                   help="self-recurrences K: first value for timesteps >= --optim_early_emp_end, last value after")
    g.add_argument("--optim_early_emp_end", type=int, default=-1,
                   help="early-step-emphasis boundary E (timestep index; -1: the first K everywhere)")
    g.add_argument("--optim_backward_guidance", action="store_true", help="turn on backward guidance (Adam on z0)")
    g.add_argument("--optim_lr", type=float, default=1e-2, help="backward guidance: Adam learning rate")
    g.add_argument("--optim_max_iters", type=int, default=1, help="backward guidance: Adam iterations")
    g.add_argument("--optim_loss_cutoff", type=float, default=1e-5, help="backward guidance: stop below this distance")
    g.add_argument("--optim_avg_sim_to_start_backward", type=float, default=0.1,
                   help="backward guidance starts once the moving-average distance is below this")
    g.add_argument("--optim_sim_queue_size", type=int, default=80, help="length of that moving average")
    g.add_argument("--optim_select_prev", action="store_true", help="keep the best z_{t-1} candidate")
    g.add_argument("--optim_timesteps", type=int, default=None,
                   help="respaced schedule: visit this many of the model's timesteps, evenly spaced "
                        "(default: all 1000, as in the reference)")
    g.add_argument("--optim_print", action="store_true", help="save intermediate images every 10 timesteps")
    g.add_argument("--optim_folder", type=str, default="./results/", help="output folder (parents are created)")
    if defaults:
        p.set_defaults(**defaults)
    return p


def settings_from_args(args) -> GuidanceSettings:
    return GuidanceSettings(
        forward_guidance=args.optim_forward_guidance, forward_guidance_wt=args.optim_forward_guidance_wt,
        grad_clip_threshold=args.optim_grad_clip_threshold, num_steps=tuple(args.optim_num_steps),
        early_emp_end=args.optim_early_emp_end, backward_guidance=args.optim_backward_guidance,
        lr=args.optim_lr, max_iters=args.optim_max_iters, loss_cutoff=args.optim_loss_cutoff,
        avg_sim_to_start_backward=args.optim_avg_sim_to_start_backward,
        sim_queue_size=args.optim_sim_queue_size, select_prev=args.optim_select_prev,
        save_intermediates=args.optim_print, timesteps=args.optim_timesteps)


def resolve_target(prompt: str, text_only: bool = False) -> tuple[str, str]:
    """→ ("image", path) or ("text", prompt). A missing path that looks like an image is an
    error, not a text prompt."""
    if text_only:
        return "text", prompt
    path = Path(prompt).expanduser()
    if path.is_file():
        return "image", str(path)
    if path.suffix.lower() in IMAGE_SUFFIXES or path.is_dir():
        raise UsageError(f"--prompt {prompt!r} looks like an image path, but no such file exists")
    return "text", prompt


def load_target_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"--prompt {path!r} is not a readable image: {err}") from err


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise UsageError(f"--device {name!r} is not available here: {err}") from err
    return device


def validate(args, latent_factor: int) -> None:
    for name in ("H", "W"):
        value = getattr(args, name)
        if value <= 0 or value % latent_factor:
            raise UsageError(f"--{name} {value} must be a positive multiple of {latent_factor} "
                             "(the first stage's down-sampling factor)")
    if not args.optim_num_steps or min(args.optim_num_steps) < 1:
        raise UsageError(f"--optim_num_steps needs positive integers, got {args.optim_num_steps}")
    if not -1 <= args.optim_early_emp_end <= 1000:
        raise UsageError(f"--optim_early_emp_end {args.optim_early_emp_end} must be in [-1, 1000]")


def prepare_output_folder(folder: Path, overwrite: bool) -> None:
    finished = folder / "metrics.json"
    if finished.exists() and not overwrite:
        raise UsageError(f"{folder} already holds a finished run ({finished.name}); choose another "
                         "--optim_folder or pass --overwrite")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to --optim_folder {str(folder)!r}: {err}") from err
    if overwrite:
        for stale in ["log.txt", "metrics.json", "out_img.png", *[p.name for p in folder.glob("out_img_best_*.png")]]:
            (folder / stale).unlink(missing_ok=True)


def _save_png(image: torch.Tensor, path: Path) -> None:
    """Save an image in [-1, 1] as the reference does (clamped, ×255, rounded), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    save_image((image.float().cpu() + 1) / 2, tmp, format="png")
    os.replace(tmp, path)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("torchvision", "open_clip_torch", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def run(extractor_cls: type[FeatureExtractor], args, *, text_only: bool = False,
        ckpt_hint: str = SD_V14_MISSING_HINT) -> dict:
    """Everything after parsing: → the metrics dict (also written to metrics.json)."""
    kind, target = resolve_target(args.prompt, text_only)
    if kind == "text" and not extractor_cls.supports_text():
        raise UsageError(f"--prompt {args.prompt!r} is not an image file, and {extractor_cls.name} "
                         "supports image targets only (text targets: scripts/clip_guided2.py)")
    target_image = load_target_image(target) if kind == "image" else None
    config = load_config(args.config)
    ddconfig = config.model.params.first_stage_config.params.ddconfig
    latent_factor = 2 ** (len(ddconfig.ch_mult) - 1)
    validate(args, latent_factor)
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from err
    device = pick_device(args.device)
    folder = Path(args.optim_folder)
    prepare_output_folder(folder, args.overwrite)

    torch.manual_seed(args.seed)
    model = load_model(args.config, args.ckpt, device, missing_hint=ckpt_hint)
    extractor = extractor_cls(weights=args.extractor_weights, device=device)
    with torch.no_grad():
        goal = (extractor.image_features(target_image) if kind == "image"
                else extractor.encode_text([target]).float())
    objective = FeatureDistance(extractor, goal)
    with torch.no_grad():
        cond = model.get_learned_conditioning([""])

    log_path = folder / "log.txt"
    with open(log_path, "w", buffering=1) as log_file:
        def log(b: int, line: str) -> None:
            log_file.write(line + "\n")

        def save_intermediate(b: int, name: str, image: torch.Tensor) -> None:
            _save_png(image, folder / name)

        channels = model.channels
        shape = (1, channels, args.H // latent_factor, args.W // latent_factor)
        generator = torch.Generator(device).manual_seed(args.seed)
        print(f"Decoding {kind} target {target!r} with {extractor.name}: "
              f"{settings.total_iterations(model.num_timesteps)} guided iterations on {device}; "
              f"outputs in {folder}")
        start = time.perf_counter()
        result = sample_feature_guided(model, cond, objective, settings, shape, [generator], log=log,
                                       on_intermediate=save_intermediate,
                                       log_cosine=extractor.log_cosine, progress=not args.no_progress)
        elapsed = time.perf_counter() - start
        log_file.write(f"Elapsed time = {elapsed} sec\n")
        log_file.write(f"Run options: {args}\n")

    best = result.best[0]
    final_path, best_path = folder / "out_img.png", folder / best.filename()
    _save_png(result.final_images[0], final_path)
    _save_png(best.image, best_path)

    def reloaded(path: Path) -> dict:
        """What a reader of the saved figure measures: reload the PNG, standard preprocessing."""
        with torch.no_grad():
            features = extractor.image_features(load_target_image(str(path)))
        return {"squared_distance": float(squared_distance(features, goal)[0]),
                "cosine": float(torch.nn.functional.cosine_similarity(features, goal)[0])}

    metrics = {
        "finished": True,
        "target": {"kind": kind, "source": target},
        "extractor": extractor.name,
        "feature_dim": int(goal.shape[-1]),
        "model": {"config": args.config, "ckpt": args.ckpt},
        "settings": asdict(settings),
        "seed": args.seed, "device": str(device), "image_size": [args.H, args.W],
        "iterations": result.iterations, "wall_time_s": elapsed,
        "guidance_gradient_guards": result.guard_events,
        "final": {"file": final_path.name,
                  "squared_distance": float(result.final_distance[0]),
                  "cosine": float(result.final_cosine[0]),
                  "reloaded_png": reloaded(final_path)},
        "best": {"file": best_path.name, "t": best.t, "rec": best.rec, "bk": best.bk,
                 "squared_distance": best.distance, "cosine": best.cosine,
                 "reloaded_png": reloaded(best_path)},
        "versions": _versions(),
        "argv": sys.argv[1:],
    }
    tmp = folder / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, folder / "metrics.json")
    print(f"final: squared distance {metrics['final']['squared_distance']:.6g}, cosine "
          f"{metrics['final']['cosine']:.4f} -> {final_path}")
    print(f"best:  squared distance {best.distance:.6g}, cosine {best.cosine:.4f} -> {best_path}")
    return metrics


def main(extractor: type[FeatureExtractor] | dict[str, type[FeatureExtractor]], *,
         description: str | None = None, defaults: dict | None = None, text_only: bool = False,
         ckpt_hint: str = SD_V14_MISSING_HINT, argv: list[str] | None = None) -> int:
    """The whole command line of a per-model script. `extractor` is one extractor class, or a
    dict name → class, which adds an `--extractor` flag choosing among them (the first is the
    default)."""
    choices = extractor if isinstance(extractor, dict) else None
    title = "/".join(choices) if choices else extractor.name
    parser = build_parser(description or f"Decode a {title} feature into images with "
                          "feature-guided latent diffusion.", defaults)
    if choices:
        parser.add_argument("--extractor", choices=list(choices), default=next(iter(choices)),
                            help="target model whose feature is decoded")
    args = parser.parse_args(argv)
    extractor_cls = choices[args.extractor] if choices else extractor
    try:
        run(extractor_cls, args, text_only=text_only, ckpt_hint=ckpt_hint)
    except (UsageError, FileNotFoundError, CheckpointError, TextTargetNotSupported) as err:
        # Expected user-facing errors (bad flags or inputs, missing or broken weights): no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
