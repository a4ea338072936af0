"""Speed of one guided iteration: seconds, memory, FLOPs, achieved TFLOP/s, projected run time.

A guided iteration is what the sampler repeats 12,960 times in a reference run: UNet forward
and backward, decoder forward and backward, extractor forward and backward (gradient to the
latent only), then one more decoder and extractor forward for the guided estimate. It is timed
inside `sample_feature_guided` itself (iteration boundaries, median of --iters after --warmup),
with random weights: timing does not depend on them.

For each configuration (model, image size, extractor, precision, batch) it reports

- s/iter: median seconds per iteration (the whole batch);
- peak memory: CUDA `torch.cuda.max_memory_allocated`; on the CPU the peak resident set size of
  the process, sampled every 2 ms while the configuration runs (weights included);
- FLOPs per iteration, counted by `torch.utils.flop_counter.FlopCounterMode` on one iteration
  (matmuls, convolutions and attention, forward and backward);
- achieved TFLOP/s, and on a known GPU the fraction of its dense peak at that precision;
- the projected time of a full reference-settings run (12,960 iterations × s/iter), and the
  ideal time of that run at an H100's bf16 peak (FLOPs only: a projection, not a measurement);
- with --waste (default), the same settings with the reference's waste (fp32, trainable UNet
  parameters, CompVis checkpointing forced on: `ldm.performance.reference_waste`) and the
  speed-up over it.

    python scripts/benchmark.py                       # GPU: 512 and 256, all extractors/precisions
    python scripts/benchmark.py --sizes 256 --extractors resnet50 --precisions fp32 bf16
    python scripts/benchmark.py --quick               # tiny sizes, 1 + 2 iterations (CI)

It prints a markdown table and writes the records as JSON (--out). Nothing is asserted about time.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.benchmarks.flops import counted_flops
from ldm.extractors import build_extractor
from ldm.cli.options import preset_options
from ldm.decoders import DecoderOptions, make_decoding, sample_batch
from ldm.models.diffusion.feature_guidance import SamplingStopped
from ldm.models.diffusion.mixed_precision import PRECISIONS
from ldm.models.loading import build_model, load_model
from ldm.objectives import FeatureDistance
from ldm.paths import ROOT
from ldm.performance import prepare, reference_waste

SD_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
TOY_CONFIG, TOY_CKPT, TOY_EXTRACTOR, TOY_SIZE = (ROOT / "configs" / "toy" / "ldm.yaml",
                                                 ROOT / "models" / "toy" / "ldm.safetensors",
                                                 "toy_all", 32)
# The two paths measured: the paper's settings and the fast preset (ldm/cli/options.py).
PAPER_SETTINGS = preset_options("paper").settings()
FAST_OPTIONS = preset_options("fast")
FAST_SETTINGS = FAST_OPTIONS.settings()
# Iterations of a run on SD's 1000-step schedule: 12,960 with the paper's settings (K = 1000 at
# the 5 noisiest timesteps, 8 after), far fewer with the fast preset's respaced schedule.
REFERENCE_ITERATIONS = PAPER_SETTINGS.total_iterations(1000)
FAST_ITERATIONS = FAST_SETTINGS.total_iterations(1000)
PATHS = ("paper", "fast")
EXTRACTORS = ("resnet50", "clip_rn50", "vit_h_14")

# Dense peak TFLOP/s by device-name fragment (first match wins): bf16, fp16, fp32. "fp32" is the
# TF32 tensor-core peak where cuDNN's TF32 convolutions are on (PyTorch's default), else FP32.
GPU_PEAKS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7, "fp32_no_tf32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0, "fp32_no_tf32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7, "fp32_no_tf32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0, "fp32_no_tf32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "fp32": 183.0, "fp32_no_tf32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0, "fp32_no_tf32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5, "fp32_no_tf32": 31.2},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6, "fp32_no_tf32": 82.6},
    "V100": {"bf16": None, "fp16": 125.0, "fp32": 15.7, "fp32_no_tf32": 15.7},
    "T4": {"bf16": None, "fp16": 65.0, "fp32": 8.1, "fp32_no_tf32": 8.1},
}
H100_BF16_PEAK = GPU_PEAKS["H100"]["bf16"]


@dataclass(frozen=True)
class Config:
    model: str            # "sd-v1" (or the --config's name) | "toy"
    size: int             # image side in pixels
    extractor: str
    precision: str
    batch: int
    waste: bool = False   # the reference's waste (ldm.performance.reference_waste)
    compile: bool = False
    channels_last: bool = False
    grad_checkpoint: bool = False
    fast: bool = False    # the fast preset's iteration (tiny decoder, no second decode, ...)

    @property
    def label(self) -> str:
        extras = [name for name, on in (("fast preset", self.fast), ("reference waste", self.waste),
                                         ("compile", self.compile), ("channels_last", self.channels_last),
                                         ("grad ckpt", self.grad_checkpoint)) if on]
        return ", ".join(extras) or "-"


@dataclass
class Record:
    config: Config
    s_per_iter: float | None = None
    s_per_iter_all: list[float] = field(default_factory=list)
    peak_memory_gib: float | None = None
    peak_memory_kind: str = ""
    flops_per_iter: float | None = None
    achieved_tflops: float | None = None
    device_peak_tflops: float | None = None
    fraction_of_peak: float | None = None
    run_iterations: int | None = None              # a whole run of its path (paper or fast preset)
    run_s: float | None = None                     # projected: run_iterations × s/iter (an upper bound
                                                   # for the fast preset: its unguided steps are UNet forwards)
    run_per_target_s: float | None = None
    ideal_run_h100_s: float | None = None          # its FLOPs at the H100's bf16 peak (projection)
    speedup_vs_reference_waste: float | None = None
    error: str | None = None


# --- memory ---------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory while the block runs: CUDA max_memory_allocated, else the sampled peak
    resident set size of the process (/proc/self/statm every 2 ms)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "process RSS peak (sampled)"

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:  # hand freed heap pages back, so that the next RSS peak is the next config's own
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


# --- building -------------------------------------------------------------------------------

def build_sd(config_path: Path, device: torch.device):
    """The model of `config_path` with random weights and without its text encoder (the
    conditioning is computed once per run, outside the guided loop; a random context stands
    in for it). → (model, context width or None)."""
    config = OmegaConf.load(config_path)
    params = config.model.params
    params.cond_stage_config = "__is_unconditional__"
    model = build_model(config)
    with torch.no_grad():  # zero-initialised output convolutions would make ε identically 0
        for name, p in model.named_parameters():
            if name.endswith("out.2.weight") or name.endswith("proj_out.weight") or \
                    name.endswith("out_layers.3.weight"):
                torch.nn.init.normal_(p, 0, 1e-3)
    context = params.unet_config.params.get("context_dim") if params.get("conditioning_key") else None
    return model.to(device), context


def build_toy(device: torch.device):
    if TOY_CKPT.is_file():
        return load_model(TOY_CONFIG, TOY_CKPT, device), None
    return build_model(OmegaConf.load(TOY_CONFIG)).to(device), None


class Builder:
    """Keeps the last model and extractor (one of each in memory at a time)."""

    def __init__(self, device: torch.device, sd_config: Path):
        self.device, self.sd_config = device, sd_config
        self.model_key = self.extractor_key = None
        self.model = self.context = self.extractor = None

    def get(self, c: Config):
        model_key = (c.model, c.waste, c.compile, c.channels_last, c.grad_checkpoint)
        if model_key != self.model_key:
            self.model = self.extractor = None
            self.model_key = self.extractor_key = None
            release_memory(self.device)
            self.model, self.context = (build_toy(self.device) if c.model == "toy"
                                        else build_sd(self.sd_config, self.device))
            self.model_key = model_key
        extractor_key = (c.extractor, c.compile, c.channels_last)
        if extractor_key != self.extractor_key:
            self.extractor = None
            release_memory(self.device)
            weights = None if c.model == "toy" else "random"
            self.extractor = build_extractor(c.extractor, weights=weights, device=self.device)
            self.extractor_key = extractor_key
            prepare(self.model, self.extractor, channels_last=c.channels_last, compile=c.compile,
                    grad_checkpoint=c.grad_checkpoint)
            if c.waste:
                reference_waste(self.model)
        return self.model, self.context, self.extractor

    def tiny_decoder(self, c: Config):
        """A random-weight tiny decoder (TAESD design) for the model's latents (fast preset)."""
        if not c.fast or FAST_OPTIONS.gradient_decoder is None:
            return None
        from ldm.models.taesd import SD_V1, TinyDecoder, TinyDecoderConfig, TinyFirstStage
        from ldm.toy_build.taesd_training import TOY_TAESD
        upsamples = self.model.latent_downsample_factor.bit_length() - 1
        config = TOY_TAESD if c.model == "toy" else TinyDecoderConfig(
            latent_channels=self.model.channels, width=SD_V1.width, upsamples=upsamples)
        return TinyFirstStage(TinyDecoder(config)).requires_grad_(False).to(self.device)


# --- measuring ------------------------------------------------------------------------------

def guided_run(model, context, extractor, c: Config, iterations: int, device: torch.device,
               on_boundary=None, tiny=None):
    """`iterations` guided iterations (K = 1, evenly spaced timesteps) of the sampler, as the
    paper's settings or the fast preset (`c.fast`, with the tiny decoder `tiny`) iterate."""
    factor = model.latent_downsample_factor
    if c.size % factor:
        raise ValueError(f"image size {c.size} is not a multiple of the latent factor {factor}")
    shape = (c.batch, model.channels, c.size // factor, c.size // factor)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        goal = extractor(torch.rand(1, 3, c.size, c.size, generator=gen, device=device) * 2 - 1)
    cond = None if context is None else torch.randn(1, 77, context, generator=gen, device=device)
    path = FAST_SETTINGS if c.fast else PAPER_SETTINGS
    settings = replace(path, num_steps=(1,), early_emp_end=-1, timesteps=iterations, guidance_stride=1,
                       save_intermediates=False)
    return sample_batch(make_decoding(DecoderOptions()), model, FeatureDistance(extractor, goal), shape,
                        range(c.batch), settings=settings, cond=cond, precision=c.precision,
                        gradient_decoder=tiny, progress=False, should_stop=on_boundary)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(model, context, extractor, c: Config, iters: int, device, tiny=None) -> list[float]:
    """Seconds of each of `iters` iterations, from the sampler's iteration boundaries."""
    stamps = []

    def boundary():
        sync(device)
        stamps.append(time.perf_counter())
        return False

    guided_run(model, context, extractor, c, iters, device, on_boundary=boundary, tiny=tiny)
    sync(device)
    stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def count_flops(model, context, extractor, c: Config, device, tiny=None) -> float:
    """FLOPs of one guided iteration that is not the last (the fast path decodes the guided
    estimate only at the last), counted in eager mode (the count is the same at every precision
    and compiled or not, and is shared between them)."""
    polls = iter(range(3))

    def two_iterations_stopped_after_the_first():
        try:
            guided_run(model, context, extractor, c, 2, device, tiny=tiny,
                       on_boundary=lambda: next(polls) == 1)
        except SamplingStopped:
            pass
    return counted_flops(two_iterations_stopped_after_the_first)


def device_peak(device: torch.device, precision: str) -> float | None:
    """Dense peak TFLOP/s of this GPU at `precision` (None on the CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in GPU_PEAKS.items():
        if fragment in name:
            if precision == "fp32" and not torch.backends.cudnn.allow_tf32:
                return peaks["fp32_no_tf32"]
            return peaks[precision]
    return None


def measure(builder: Builder, c: Config, args, flops_cache: dict) -> Record:
    record = Record(c)
    device = builder.device
    try:
        model, context, extractor = builder.get(c)
        tiny = builder.tiny_decoder(c)
        flop_key = (c.model, c.size, c.extractor, c.batch, c.waste, c.fast)
        warmup = args.warmup
        if flop_key not in flops_cache:  # the counted iteration is also a warm-up iteration
            flops_cache[flop_key] = count_flops(model, context, extractor, c, device, tiny)
            warmup = max(warmup - (not c.compile), 0)
        record.flops_per_iter = flops_cache[flop_key]
        with PeakMemory(device) as memory:
            times = time_iterations(model, context, extractor, c, warmup + args.iters, device, tiny)
        record.s_per_iter_all = times[warmup:]
        record.s_per_iter = statistics.median(record.s_per_iter_all)
        record.peak_memory_gib = memory.peak / 2 ** 30
        record.peak_memory_kind = memory.kind
        record.achieved_tflops = record.flops_per_iter / record.s_per_iter / 1e12
        record.device_peak_tflops = device_peak(device, c.precision)
        if record.device_peak_tflops:
            record.fraction_of_peak = record.achieved_tflops / record.device_peak_tflops
        record.run_iterations = FAST_ITERATIONS if c.fast else REFERENCE_ITERATIONS
        record.run_s = record.run_iterations * record.s_per_iter
        record.run_per_target_s = record.run_s / c.batch
        record.ideal_run_h100_s = record.run_iterations * record.flops_per_iter / (H100_BF16_PEAK * 1e12)
    except Exception as error:  # one failing configuration (memory, a missing file) is reported
        record.error = f"{type(error).__name__}: {error}"
        if args.strict:
            raise
    return record


# --- configurations and output ----------------------------------------------------------------

def configurations(args, device: torch.device) -> list[Config]:
    channels_last = {"on": True, "off": False, "auto": device.type == "cuda"}[args.channels_last]
    common = dict(compile=args.compile, channels_last=channels_last,
                  grad_checkpoint=args.grad_checkpoint)
    sd_name = "sd-v1" if Path(args.config).resolve() == SD_CONFIG.resolve() else Path(args.config).stem
    configs = []
    if "sd" in args.models:
        for size in args.sizes:
            for name in args.extractors:
                for batch in args.batch:
                    if batch > 1 and name not in args.batch_extractors:
                        continue
                    configs += [Config(sd_name, size, name, p, batch, fast=path == "fast", **common)
                                for path in args.paths for p in args.precisions]
    if "toy" in args.models:
        configs += [Config("toy", TOY_SIZE, TOY_EXTRACTOR, p, b, fast=path == "fast", **common)
                    for b in args.batch for path in args.paths for p in args.precisions]
    if args.waste and "sd" in args.models:
        waste_extractor = "resnet50" if "resnet50" in args.extractors else args.extractors[0]
        configs += [Config(sd_name, size, waste_extractor, "fp32", 1, waste=True)
                    for size in args.sizes]
    return configs


def add_speedups(records: list[Record]) -> None:
    waste = {(r.config.model, r.config.size, r.config.extractor, r.config.batch): r.s_per_iter
             for r in records if r.config.waste and r.s_per_iter}
    for r in records:
        key = (r.config.model, r.config.size, r.config.extractor, r.config.batch)
        if not r.config.waste and r.s_per_iter and key in waste:
            r.speedup_vs_reference_waste = waste[key] / r.s_per_iter


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def markdown_table(records: list[Record]) -> str:
    lines = ["| model | size | extractor | precision | batch | settings | s/iter | peak mem GiB | "
             "TFLOP/iter | TFLOP/s | % of peak | run (projected) | ideal run at H100 peak | "
             "vs waste |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        c = r.config
        if r.error:
            lines.append(f"| {c.model} | {c.size} | {c.extractor} | {c.precision} | {c.batch} | "
                         f"{c.label} | failed: {r.error[:80]} | | | | | | | |")
            continue
        lines.append(
            f"| {c.model} | {c.size} | {c.extractor} | {c.precision} | {c.batch} | {c.label} | "
            f"{_fmt(r.s_per_iter, '.3f')} | {_fmt(r.peak_memory_gib, '.2f')} | "
            f"{_fmt(r.flops_per_iter and r.flops_per_iter / 1e12, '.3f')} | "
            f"{_fmt(r.achieved_tflops, '.3f')} | {_fmt(r.fraction_of_peak and 100 * r.fraction_of_peak, '.1f')} | "
            f"{_duration(r.run_s)} | {_duration(r.ideal_run_h100_s)} | "
            f"{_fmt(r.speedup_vs_reference_waste, '.2f')}{'x' if r.speedup_vs_reference_waste else ''} |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "reference_iterations": REFERENCE_ITERATIONS,
           "fast_preset_iterations": FAST_ITERATIONS,
           "h100_bf16_peak_tflops": H100_BF16_PEAK,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    return env


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small CI run: toy model + SD v1 at 64x64 with ResNet-50, fp32, batch 1, "
                             "1 warm-up + 2 timed iterations, no reference-waste run")
    parser.add_argument("--models", nargs="+", choices=("sd", "toy"), default=["sd", "toy"])
    parser.add_argument("--config", default=str(SD_CONFIG), help="model config of 'sd' (default SD v1)")
    parser.add_argument("--sizes", nargs="+", type=int, help="image sizes (default 512 256 on a GPU, 256 on the CPU)")
    parser.add_argument("--extractors", nargs="+", help="default " + " ".join(EXTRACTORS))
    parser.add_argument("--precisions", nargs="+", choices=tuple(PRECISIONS),
                        help="default fp32 bf16 fp16 on a GPU; fp32 bf16 on the CPU (fp16 autocast "
                             "runs there but has no fast kernels)")
    parser.add_argument("--batch", nargs="+", type=int, help="batch sizes (default 1 4 on a GPU, 1 on the CPU)")
    parser.add_argument("--batch_extractors", nargs="+", default=list(EXTRACTORS),
                        help="extractors that get the batch sizes above 1 (default all)")
    parser.add_argument("--iters", type=int, help="timed iterations (default 5 on a GPU, 2 on the CPU)")
    parser.add_argument("--warmup", type=int, help="warm-up iterations (default 2 on a GPU, 1 on the CPU)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                        help="the paper's iteration, the fast preset's, or both (default both)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet, decoder and extractor")
    parser.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                        help="NHWC memory layout (auto: on CUDA only)")
    parser.add_argument("--grad_checkpoint", action="store_true", help="activation checkpointing on")
    parser.add_argument("--waste", action=argparse.BooleanOptionalAction, default=True,
                        help="also run ResNet-50 fp32 batch 1 with the reference's waste (default on)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="outputs/benchmark_results.json",
                        help="the JSON records (default: outputs/benchmark_results.json)")
    parser.add_argument("--strict", action="store_true", help="stop at the first failing configuration")
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    if args.quick:
        defaults = dict(sizes=[64], extractors=["resnet50"], precisions=["fp32"], batch=[1],
                        iters=2, warmup=1)
        args.waste = False
    else:
        defaults = dict(sizes=[512, 256] if gpu else [256], precisions=list(PRECISIONS) if gpu
                        else ["fp32", "bf16"], batch=[1, 4] if gpu else [1],
                        iters=5 if gpu else 2, warmup=2 if gpu else 1)
        defaults["extractors"] = list(EXTRACTORS)
    for name, value in defaults.items():  # explicit flags win, in --quick too
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be at least 1 and --warmup at least 0")
    return args


def run(argv=None) -> list[Record]:
    """Measure every configuration of the command line `argv`; → the records (also printed
    as a table and written as JSON)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    configs = configurations(args, device)
    builder, flops_cache, records = Builder(device, Path(args.config)), {}, []
    print(f"{len(configs)} configurations on {device} ({torch.get_num_threads()} threads); "
          f"{args.warmup} warm-up + {args.iters} timed iterations each", file=sys.stderr)
    for c in configs:
        start = time.perf_counter()
        record = measure(builder, c, args, flops_cache)
        records.append(record)
        status = record.error or f"{record.s_per_iter:.3f} s/iter"
        print(f"  {c.model} {c.size} {c.extractor} {c.precision} batch {c.batch} [{c.label}]: "
              f"{status} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    add_speedups(records)
    table = markdown_table(records)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(device),
                               "records": [{**asdict(r), "config": asdict(r.config)} for r in records]},
                              indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return records


def main(argv=None) -> int:
    run(argv)
    return 0
