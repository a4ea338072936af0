"""Benchmark of the decoder's central claim on the toy world, where the truth is known:
the decoded images keep exactly the attributes that the feature encodes.

For each toy extractor (shape-only, colour-only, all attributes) it decodes a fixed held-out set
of targets (one batch, one seed per target), and the same targets without guidance (same
seeds: the unguided baseline). It reports

- feature fidelity of the final and the best image: squared distance and cosine similarity to
  the target feature, guided vs unguided;
- attribute agreement between target and decoded image, read by the oracle: shape, colour and
  size-class accuracy and position error in pixels, against chance and the unguided baseline;

and writes `results.json`, `results.md` (the table) and `mosaic.png` into --out.

    python scripts/toy_benchmark.py                 # the full benchmark (README table)
    python scripts/toy_benchmark.py --quick         # a small version, used by the test suite
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.objectives import FeatureDistance
from ldm.extractors.toy import TOY_EXTRACTORS
from ldm.models.diffusion.feature_guidance import GuidanceSettings, sample_feature_guided
from ldm.models.loading import load_model
from ldm.toy import world
from ldm.toy.defaults import TOY_CKPT, TOY_CKPT_HINT, TOY_CONFIG, TOY_DEFAULTS
from ldm.toy.oracle import Oracle

HELD_OUT_SEED = 2026            # not a seed of any training set (ldm/toy, configs/toy)
ATTRIBUTES = ("shape", "colour", "size_class")


def guidance_settings(guided: bool, timesteps: int) -> GuidanceSettings:
    return GuidanceSettings(
        forward_guidance=guided, forward_guidance_wt=TOY_DEFAULTS["optim_forward_guidance_wt"],
        grad_clip_threshold=TOY_DEFAULTS["optim_grad_clip_threshold"],
        num_steps=tuple(TOY_DEFAULTS["optim_num_steps"]), early_emp_end=TOY_DEFAULTS["optim_early_emp_end"],
        timesteps=timesteps)


def decode(model, extractor, targets: torch.Tensor, settings: GuidanceSettings, seed: int):
    """Decode a batch of target images' features; → dict of tensors (images in [0, 1])."""
    with torch.no_grad():
        goal = extractor(targets * 2 - 1)
    gens = [torch.Generator().manual_seed(seed + b) for b in range(len(targets))]
    shape = (len(targets), model.channels, model.image_size, model.image_size)
    result = sample_feature_guided(model, None, FeatureDistance(extractor, goal), settings, shape, gens,
                                   progress=sys.stderr.isatty())
    best = torch.stack([b.image for b in result.best])
    return {
        "final": ((result.final_images + 1) / 2).clamp(0, 1), "best": ((best + 1) / 2).clamp(0, 1),
        "final_distance": result.final_distance, "final_cosine": result.final_cosine,
        "best_distance": torch.tensor([b.distance for b in result.best]),
        "best_cosine": torch.tensor([b.cosine for b in result.best]),
        "iterations": result.iterations,
    }


def agreement(oracle: Oracle, images: torch.Tensor, truth: list[world.Attributes]) -> dict:
    """Oracle readings of decoded images vs the targets' true attributes."""
    readings = oracle.read_batch(images)
    out = {f"{a}_acc": float(np.mean([getattr(r, a) == getattr(t, a) for r, t in zip(readings, truth)]))
           for a in ATTRIBUTES}
    out["position_err_px"] = float(np.mean([math.hypot(r.cx - t.cx, r.cy - t.cy)
                                            for r, t in zip(readings, truth)]))
    out["clean_rate"] = float(np.mean([r.clean for r in readings]))
    return out


def chance_levels(truth: list[world.Attributes], seed: int) -> dict:
    """Agreement of an image drawn at random from the world (attributes independent of the target)."""
    rng = np.random.default_rng(seed)
    others = [world.sample_attributes(rng) for _ in range(20000)]
    pairs = list(zip(others, (truth * (len(others) // len(truth) + 1))[:len(others)]))
    out = {f"{a}_acc": float(np.mean([getattr(o, a) == getattr(t, a) for o, t in pairs])) for a in ATTRIBUTES}
    out["position_err_px"] = float(np.mean([math.hypot(o.cx - t.cx, o.cy - t.cy) for o, t in pairs]))
    return out


def summarise(decoded: dict, oracle: Oracle, truth) -> dict:
    out = {}
    for which in ("final", "best"):
        out[which] = {"squared_distance": float(decoded[f"{which}_distance"].mean()),
                      "cosine_mean": float(decoded[f"{which}_cosine"].mean()),
                      "cosine_min": float(decoded[f"{which}_cosine"].min()),
                      **agreement(oracle, decoded[which], truth)}
    return out


def markdown(results: dict) -> str:
    chance = results["chance"]
    lines = [
        f"Toy benchmark: {results['n_targets']} held-out targets per extractor, "
        f"{results['iterations']} guided iterations each ({results['settings']}); "
        f"{results['seconds']:.0f} s on {results['device']}.",
        "",
        "| extractor | run | image | cosine (mean / min) | sq. distance | shape acc | colour acc | size acc | position err (px) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results["extractors"].items():
        for run in ("guided", "unguided"):
            for which in ("final", "best"):
                r = rows[run][which]
                lines.append(f"| {name} | {run} | {which} | {r['cosine_mean']:.3f} / {r['cosine_min']:.3f} | "
                             f"{r['squared_distance']:.3g} | {r['shape_acc']:.2f} | {r['colour_acc']:.2f} | "
                             f"{r['size_class_acc']:.2f} | {r['position_err_px']:.1f} |")
    lines.append(f"| chance | | | | | {chance['shape_acc']:.2f} | {chance['colour_acc']:.2f} | "
                 f"{chance['size_class_acc']:.2f} | {chance['position_err_px']:.1f} |")
    return "\n".join(lines) + "\n"


def mosaic(targets: torch.Tensor, decoded: dict[str, dict], n: int, scale: int = 3) -> Image.Image:
    """Rows: targets; columns: target, then the final image of each extractor."""
    names = list(decoded)
    side, pad, head = 32 * scale, 4, 16
    canvas = Image.new("RGB", (pad + (len(names) + 1) * (side + pad), head + n * (side + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, title in enumerate(["target", *names]):
        draw.text((pad + c * (side + pad), 2), title, fill="black", font=font)
    for r in range(n):
        images = [targets[r], *[decoded[name]["final"][r] for name in names]]
        for c, image in enumerate(images):
            tile = Image.fromarray(world.to_uint8(image)).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (pad + c * (side + pad), head + r * (side + pad)))
    return canvas


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50, help="held-out targets per extractor")
    parser.add_argument("--timesteps", type=int, default=TOY_DEFAULTS["optim_timesteps"],
                        help="respaced schedule length")
    parser.add_argument("--seed", type=int, default=0, help="first sampling seed (target b uses seed + b)")
    parser.add_argument("--out", default="outputs/toy_benchmark")
    parser.add_argument("--quick", action="store_true", help="12 targets, 50 timesteps (a few minutes)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.timesteps = 12, 50
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    model = load_model(TOY_CONFIG, TOY_CKPT, "cpu", missing_hint=TOY_CKPT_HINT)
    targets, truth = world.make_dataset(args.n, HELD_OUT_SEED)
    oracle = Oracle()
    results = {"n_targets": args.n, "timesteps": args.timesteps, "device": "cpu",
               "torch_threads": torch.get_num_threads(), "chance": chance_levels(truth, HELD_OUT_SEED),
               "extractors": {}}
    guided = guidance_settings(True, args.timesteps)
    unguided = guidance_settings(False, args.timesteps)
    finals = {}
    for name, cls in TOY_EXTRACTORS.items():
        extractor = cls()
        t0 = time.perf_counter()
        decoded = decode(model, extractor, targets, guided, args.seed)
        plain = decode(model, extractor, targets, unguided, args.seed)
        finals[name] = decoded
        results["extractors"][name] = {"guided": summarise(decoded, oracle, truth),
                                       "unguided": summarise(plain, oracle, truth),
                                       "seconds": time.perf_counter() - t0}
        results["iterations"] = decoded["iterations"]
        g = results["extractors"][name]["guided"]["final"]
        print(f"{name}: cosine {g['cosine_mean']:.3f} (min {g['cosine_min']:.3f}), shape {g['shape_acc']:.2f}, "
              f"colour {g['colour_acc']:.2f}, size {g['size_class_acc']:.2f}, position "
              f"{g['position_err_px']:.1f} px ({time.perf_counter() - t0:.0f} s)", flush=True)
    results["seconds"] = time.perf_counter() - start
    results["settings"] = (f"--optim_timesteps {args.timesteps} --optim_num_steps "
                           f"{' '.join(map(str, guided.num_steps))} --optim_early_emp_end {guided.early_emp_end} "
                           f"--optim_forward_guidance_wt {guided.forward_guidance_wt} "
                           f"--optim_grad_clip_threshold {guided.grad_clip_threshold}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "results.md").write_text(table)
    mosaic(targets, finals, min(8, args.n)).save(out / "mosaic.png")
    print("\n" + table)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'mosaic.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
