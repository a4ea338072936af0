"""The GPU check: everything a lent GPU can tell, in one command (`make gpu-check`, at most
8 minutes on one GPU), written as a markdown table and JSON.

1. Correctness: guided decoding on the tiny SD stand-in (ldm/models/tiny_sd.py, random weights)
   with the toy extractor, on the device and on the CPU in fp32 (TF32 off), must agree closely;
   bf16 and fp16 runs on the device must finish without NaN.
2. Speed at 512 (ldm/benchmarks/speed.py) with SD-architecture random weights for ResNet-50,
   CLIP RN50 and ViT-H/14 at batch 1 and 4 in fp32 and bf16, each on the paper's iteration and
   the fast preset's: seconds per iteration, TFLOP/s, fraction of the device's peak, peak memory,
   and the projected time of a whole run (12,960 iterations for the paper's settings; the fast
   preset's count for it).
3. FeatInv training throughput (ldm/featinv/throughput.py): images/s of training steps at 256 px
   on miniSD's architecture, bf16, batch 8 and 32, peak memory (--quick: the tiny stand-in).
4. The issue's targets, met or not: the paper path at ≥ 40 % of the bf16 peak at batch 4, peak
   memory < 24 GB at batch 1, the fast preset's projected run under 30 s.

    python scripts/gpu_check.py                      # on the GPU (make gpu-check)
    python scripts/gpu_check.py --device cpu --quick # everything but the CUDA-only parts (CI)

Configurations left when the time budget (--budget_s) is spent are reported as skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path

import torch

from ldm.benchmarks import speed
from ldm.models.tiny_sd import TINY_CONFIG, tiny_model
from ldm.extractors import build_extractor
from ldm.decoders import DecoderOptions, make_decoding, sample_batch
from ldm.featinv.throughput import markdown_table as throughput_table
from ldm.featinv.throughput import training_throughput
from ldm.models.diffusion.feature_guidance import GuidanceSettings
from ldm.objectives import FeatureDistance

PEAK_FRACTION_GOAL = 0.40          # the paper path at batch 4, bf16
MEMORY_GOAL_GIB = 24 * 1e9 / 2 ** 30   # 24 GB at batch 1
FAST_RUN_GOAL_S = 30.0
CORRECTNESS_TOLERANCE = 1e-2       # max |CPU − device| of the final images in [-1, 1], fp32


# --- correctness ------------------------------------------------------------------------------

def tiny_run(device: torch.device, precision: str, iterations: int) -> dict:
    """`iterations` guided iterations on the tiny SD stand-in → final images (on the CPU) and
    the last logged distances."""
    model = tiny_model(timesteps=iterations).to(device)
    extractor = build_extractor("toy_all", device=device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        goal = extractor(torch.rand(2, 3, 16, 16, generator=gen).to(device) * 2 - 1)
    cond = model.get_learned_conditioning([""] * 2)
    settings = GuidanceSettings(forward_guidance=True, forward_guidance_wt=4.0, grad_clip_threshold=3.0)
    result = sample_batch(make_decoding(DecoderOptions()), model, FeatureDistance(extractor, goal),
                          (2, model.channels, 4, 4), range(2), settings=settings, cond=cond,
                          precision=precision, progress=False)
    images = result.final_images.float().cpu()
    return {"images": images, "finite": bool(torch.isfinite(images).all())}


@contextlib.contextmanager
def without_tf32():
    """CUDA matmuls and convolutions in true fp32 inside the block."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def correctness(device: torch.device, iterations: int) -> list[dict]:
    """fp32 on the device against the CPU, then bf16 and fp16 on the device."""
    rows = []
    with without_tf32():
        reference = tiny_run(torch.device("cpu"), "fp32", iterations)
        here = tiny_run(device, "fp32", iterations)
    diff = float((here["images"] - reference["images"]).abs().max())
    rows.append({"check": f"fp32 {device.type} vs cpu", "max_abs_diff": diff,
                 "passed": here["finite"] and diff <= CORRECTNESS_TOLERANCE,
                 "note": "same device: trivially equal" if device.type == "cpu" else
                         f"tolerance {CORRECTNESS_TOLERANCE}"})
    for precision in ("bf16", "fp16"):
        run = tiny_run(device, precision, iterations)
        diff = float((run["images"] - reference["images"]).abs().max()) if run["finite"] else None
        rows.append({"check": f"{precision} {device.type} finishes without NaN", "max_abs_diff": diff,
                     "passed": run["finite"], "note": "difference to fp32 CPU, for information"})
    return rows


# --- speed ------------------------------------------------------------------------------------

def speed_configs(quick: bool) -> list[speed.Config]:
    """512 px with SD v1's architecture; --quick: the tiny stand-in at 16 px, ResNet-50, batch 1,
    fp32."""
    model, size, extractors, batches = (("sd-v1-tiny", 16, ("resnet50",), (1,)) if quick
                                        else ("sd-v1", 512, speed.EXTRACTORS, (1, 4)))
    precisions = ("fp32",) if quick else ("fp32", "bf16")   # bf16 has no fast CPU kernels
    return [speed.Config(model, size, name, precision, batch, fast=fast)
            for name in extractors for batch in batches for precision in precisions
            for fast in (False, True)]


def measure_speed(device: torch.device, configs: list[speed.Config], iters: int, warmup: int,
                  deadline: float) -> list[speed.Record]:
    sd_config = TINY_CONFIG if configs[0].model == "sd-v1-tiny" else speed.SD_CONFIG
    builder, cache, records = speed.Builder(device, sd_config), {}, []
    args = Namespace(warmup=warmup, iters=iters, strict=False)
    for c in configs:
        if time.monotonic() > deadline:
            records.append(speed.Record(c, error="skipped: time budget spent"))
            continue
        start = time.perf_counter()
        records.append(speed.measure(builder, c, args, cache))
        r = records[-1]
        print(f"  {c.extractor} batch {c.batch} {c.precision} [{c.label}]: "
              f"{r.error or f'{r.s_per_iter:.3f} s/iter'} ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
    return records


def goals(records: list[speed.Record], on_gpu: bool) -> list[dict]:
    """The issue's GPU targets, each met, missed or not measured."""
    def verdict(name, values, ok):
        measured = [v for v in values if v is not None]
        status = ("not measured" if not measured or not on_gpu else
                  "met" if all(ok(v) for v in measured) else "not met")
        return {"goal": name, "values": measured, "status": status}

    ok = [r for r in records if r.s_per_iter]
    return [
        verdict(f"paper path >= {PEAK_FRACTION_GOAL:.0%} of the bf16 peak at batch 4",
                [r.fraction_of_peak for r in ok if not r.config.fast and r.config.batch == 4
                 and r.config.precision == "bf16"], lambda v: v >= PEAK_FRACTION_GOAL),
        verdict("peak memory < 24 GB at batch 1 (GiB)",
                [r.peak_memory_gib for r in ok if r.config.batch == 1], lambda v: v < MEMORY_GOAL_GIB),
        verdict(f"fast preset's projected run < {FAST_RUN_GOAL_S:.0f} s (bf16, batch 1, s)",
                [r.run_s for r in ok if r.config.fast and r.config.batch == 1
                 and r.config.precision == "bf16"], lambda v: v < FAST_RUN_GOAL_S),
    ]


# --- output -----------------------------------------------------------------------------------

def markdown(env: dict, checks: list[dict], records: list[speed.Record], verdicts: list[dict]) -> str:
    lines = [f"# GPU check: {env.get('gpu', env['device'])}", "",
             f"torch {env['torch']}, {env['date']}; paper run = {speed.REFERENCE_ITERATIONS:,} "
             f"iterations, fast preset run = {speed.FAST_ITERATIONS:,}.", "", "## Correctness", "",
             "| check | max abs diff | passed | note |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {speed._fmt(c['max_abs_diff'], '.2e')} | {'yes' if c['passed'] else 'NO'} | "
              f"{c['note']} |" for c in checks]
    lines += ["", "## Speed", "", speed.markdown_table(records), "", "## Targets", "",
              "| goal | measured | status |", "|---|---|---|"]
    lines += [f"| {v['goal']} | {', '.join(f'{x:.3g}' for x in v['values']) or '-'} | {v['status']} |"
              for v in verdicts]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device checked (default cuda)")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny SD stand-in at 16 px, ResNet-50, batch 1, 1 timed iteration "
                             "(the CPU test in CI; its times say nothing about SD)")
    parser.add_argument("--out", default="outputs/gpu_check", help="folder for gpu_check.md and .json")
    parser.add_argument("--budget_s", type=float, default=420.0,
                        help="stop starting configurations after this many seconds (default 420)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: run it on the GPU machine, or give --device cpu --quick "
                     "to check everything but the CUDA-only parts")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, start = torch.device(args.device), time.monotonic()
    print(f"GPU check on {device}: correctness", file=sys.stderr, flush=True)
    checks = correctness(device, iterations=5)
    print("speed", file=sys.stderr, flush=True)
    iters, warmup = (1, 1) if args.quick else (3, 1)
    records = measure_speed(device, speed_configs(args.quick), iters, warmup, start + args.budget_s)
    training = []
    if time.monotonic() < start + args.budget_s:
        print("featinv training", file=sys.stderr, flush=True)
        training = training_throughput(device, args.quick)
    env = {**speed.environment(device), "seconds": round(time.monotonic() - start, 1)}
    verdicts = goals(records, device.type == "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(env, checks, records, verdicts) + throughput_table(training)
    (out / "gpu_check.md").write_text(table)
    (out / "gpu_check.json").write_text(json.dumps(
        {"environment": env, "correctness": checks, "goals": verdicts, "featinv_training": training,
         "records": [{**asdict(r), "config": asdict(r.config)} for r in records]}, indent=2) + "\n")
    print(table)
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'} ({env['seconds']:.0f} s)",
          file=sys.stderr)
    return 0 if all(c["passed"] for c in checks) else 1
