"""The command line shared by every script (`scripts/*_guided.py`, `scripts/feature_guided.py`).

A script is its extractor (a registry name or a class) plus one call:
`main("torchvision:resnet50")`. This module parses the reference's flags, checks them before any
model loads, resolves the targets (images, text, feature files, feature arithmetic; several per
run, decoded in batches), runs the guided sampler through `ldm.api.FeatureDecoder` and writes the
outputs the reference writes (`out_img.png`, the best image, intermediates with `--optim_print`,
`log.txt`), plus `metrics.json` and `target_features.safetensors`. One target writes into
`--optim_folder`; several write one subfolder each (named after the image, file or prompt).
Under `torchrun`, each process decodes its share of the targets (ldm/sharding.py).

Runs survive interruption: the resume state (ldm/run_state.py) is written every `--save_every`
iterations and on SIGINT/SIGTERM, `--resume` continues bit for bit, a folder holding a finished
or interrupted run is never clobbered without `--overwrite`, every image and JSON file is
written atomically, and a NaN/inf stops the run keeping the best image and the state.

Exit codes: 0 finished, 2 bad input (message, no traceback), 3 numerical fault, 130 / 143
stopped by SIGINT / SIGTERM (state saved).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchvision.utils import save_image

from ldm.api import PRECISIONS, FeatureDecoder, TargetFeatures, load_image
from ldm.checkpoint import CheckpointError, CheckpointNotFoundError
from ldm.extractors import build_extractor, parse_spec
from ldm.extractors.base import ExtractorSpecError, FeatureExtractor, TextTargetNotSupported
from ldm.models.diffusion.feature_guidance import (BestImage, GuidanceSettings, NumericalFault,
                                                   SamplerState, SamplingStopped)
from ldm.objectives import LOSSES, parse_channels
from ldm.models.loading import (DEFAULT_CKPT, DEFAULT_CONFIG, SD_V14_MISSING_HINT, load_config,
                                load_model)
from ldm.run_state import (STATE_FILE, RunStateError, atomic_write_text, commit,
                           fingerprint_differences, folder_status, load_state, peek_run, position,
                           run_fingerprint, save_state, split_state, stack_states, temporary_path)
from ldm.performance import prepare
from ldm.sharding import (Shard, barrier, current_shard, from_rank0, gather, init_group,
                          leave_group)
from ldm.targets import Target, TargetError, expand_targets, read_target_list

# Flags the reference parses but never uses: not accepted here (listed in the README).
DROPPED_REFERENCE_FLAGS = (
    "--laion400m", "--fixed_code", "--ddim_eta", "--n_iter", "--C", "--f", "--n_samples", "--steps",
    "--mode", "--epochs", "--save_image_folder", "--optim_mask_type", "--optim_original_conditioning",
    "--optim_do_forward_guidance_norm", "--optim_tv_loss", "--optim_warm_start", "--optim_aug",
    "--optim_mask_fraction", "--text", "--text_type", "--batches",
)


EXIT_BAD_INPUT, EXIT_NUMERICAL_FAULT = 2, 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class UsageError(Exception):
    """A problem with the command line or its inputs; printed without a traceback."""


class RunStopped(Exception):
    """The run stopped before finishing (signal or numerical fault) after saving what it had;
    `exit_code` is what the process should exit with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def build_parser(description: str, defaults: dict | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", type=str, nargs="+", default=["data/examples/chelsea.jpg"],
                   help="targets: image paths, folders of images, feature files (.npy .pt .safetensors), "
                        "feature arithmetic such as 'image(\"a.jpg\") + 0.5 * (text(\"a dog\") - "
                        "text(\"a cat\"))', or text prompts (text needs a text tower, e.g. CLIP); "
                        "several targets are decoded in batches, one subfolder each")
    p.add_argument("--prompt_file", type=str, default=None,
                   help="a text file with one more target per line (# comments)")
    p.add_argument("--batch_size", type=int, default=4,
                   help="targets decoded together (a target's result does not depend on its batch)")
    p.add_argument("--H", type=int, default=512, help="image height in pixels")
    p.add_argument("--W", type=int, default=512, help="image width in pixels")
    p.add_argument("--config", type=str, default=DEFAULT_CONFIG, help="latent diffusion model config")
    p.add_argument("--ckpt", type=str, default=DEFAULT_CKPT, help="latent diffusion checkpoint (.ckpt or .safetensors)")
    p.add_argument("--seed", type=int, default=42, help="random seed (the same seed on the same device gives the same images)")
    p.add_argument("--device", type=str, default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--extractor_weights", type=str, default=None,
                   help="local weights file of the target model (default: the library's download cache)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a folder that holds a finished or interrupted run (its outputs are deleted)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --optim_folder from its resume state (same flags)")
    p.add_argument("--save_every", type=int, default=None,
                   help="write the resume state every N guided iterations (default: 5%% of the run's iterations)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")

    f = p.add_argument_group("feature and loss")
    f.add_argument("--layer", type=str, default=None,
                   help="decode the output of this submodule of the target model instead of its "
                        "final embedding (e.g. layer3); a wrong name lists the valid ones")
    f.add_argument("--spatial", action="store_true",
                   help="keep the layer's spatial map (C x H x W, compared position by position) "
                        "instead of pooling it to a vector")
    f.add_argument("--channels", type=str, default=None,
                   help="compare only these channels (dimension 1 of the feature): e.g. 0:64,100")
    f.add_argument("--loss", choices=LOSSES, default="squared",
                   help="squared Euclidean distance (the reference) or 1 - cosine similarity")

    sp = p.add_argument_group("speed")
    sp.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="autocast precision of the UNet, decoder and target model (fp32 reproduces "
                        "the reference; bf16 is the fast choice on recent GPUs)")
    sp.add_argument("--compile", action="store_true", help="torch.compile the networks (pays off on long GPU runs)")
    sp.add_argument("--grad_checkpoint", action="store_true",
                   help="recompute activations in the backward pass: less memory, about 30%% slower")

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


def load_target_image(path: str):
    """The target image, fully read and checked to convert to RGB; UsageError if unreadable."""
    try:
        return load_image(path)
    except TargetError as err:
        raise UsageError(f"--prompt {err}") from None


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except Exception as err:  # RuntimeError, AssertionError ("not compiled with CUDA"), ...
        raise UsageError(f"--device {name!r} is not available here: {err}") from err
    return device


def _flag_given(argv: list[str], flag: str) -> bool:
    """Whether `flag` is in argv, also as an abbreviation argparse accepted (--res, --overw)."""
    return any(len(a) > 3 and a.startswith("--") and flag.startswith(a) for a in argv)


def validate_flags(args) -> None:
    """Checks that need nothing but the flags."""
    if not args.optim_num_steps or min(args.optim_num_steps) < 1:
        raise UsageError(f"--optim_num_steps needs positive integers, got {args.optim_num_steps}")
    if not -1 <= args.optim_early_emp_end <= 1000:
        raise UsageError(f"--optim_early_emp_end {args.optim_early_emp_end} must be in [-1, 1000] "
                         "(a timestep index; -1, the default, means the first K everywhere)")
    if args.save_every is not None and args.save_every < 1:
        raise UsageError(f"--save_every {args.save_every} must be at least 1 (iterations)")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size {args.batch_size} must be at least 1")
    if args.channels is not None:
        try:
            parse_channels(args.channels)
        except ValueError as err:
            raise UsageError(f"--channels: {err}") from None
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --optim_folder and --overwrite deletes it: "
                         "give one of them")


def validate(args, latent_factor: int) -> None:
    validate_flags(args)
    for name in ("H", "W"):
        value = getattr(args, name)
        if value <= 0 or value % latent_factor:
            raise UsageError(f"--{name} {value} must be a positive multiple of {latent_factor} "
                             "(the first stage's down-sampling factor)")


def check_weight_files(args, ckpt_hint: str) -> None:
    """The weight files exist (their contents are checked when they load)."""
    if not Path(args.ckpt).is_file():
        if Path(args.ckpt).exists():
            raise CheckpointError(f"--ckpt {args.ckpt!r} is not a file")
        raise CheckpointNotFoundError(ckpt_hint.format(path=args.ckpt))
    weights = args.extractor_weights
    if weights is not None and _looks_like_path(weights) and not Path(weights).is_file():
        raise UsageError(f"--extractor_weights {weights!r}: no such file")


def _looks_like_path(weights: str) -> bool:
    """A weights file, not a tag ("random", "IMAGENET1K_V2", "openai", "a1_in1k")."""
    return "/" in weights or os.sep in weights or Path(weights).suffix != "" or Path(weights).exists()


_OUTPUT_PATTERNS = ("log.txt", "metrics.json", "out_img.png", "out_img_best_t_*.png", STATE_FILE,
                    "original_guidance_*_*.png", "guidance_3_*_*.png", "guidance_2_*_b.png")
_TEMPORARY = re.compile(r"^\..+\.\d+\.tmp$")


def prepare_output_folder(folder: Path, overwrite: bool, resume: bool = False) -> str:
    """Refuse to clobber a finished or interrupted run, check that the folder is writable and
    create it. → the folder's status before this run ("new", "finished", "interrupted")."""
    status, detail = folder_status(folder) if folder.is_dir() else ("new", "")
    if status == "finished" and not overwrite:
        if resume:
            raise UsageError(f"the run in {folder} is finished ({detail}); there is nothing to "
                             "resume (pass --overwrite instead of --resume to run it again)")
        raise UsageError(f"{folder} already holds a finished run ({detail}); choose another "
                         "--optim_folder or pass --overwrite")
    if status == "interrupted" and not (overwrite or resume):
        where = ""
        if (folder / STATE_FILE).is_file():
            try:
                sampler = peek_run(folder / STATE_FILE)["sampler"]
                where = f", stopped at timestep {sampler['timestep']} after {sampler['iterations']} iterations"
            except Exception:  # noqa: BLE001 - only decorates the message
                pass
        raise UsageError(f"{folder} holds an interrupted run ({detail}{where}); pass --resume to "
                         "continue it or --overwrite to start again")
    if status == "new" and resume:
        raise UsageError(f"no resume state in {folder} ({STATE_FILE} does not exist): nothing to "
                         "resume; run without --resume to start")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to --optim_folder {str(folder)!r}: {err}") from err
    stale = [p for p in folder.iterdir() if _TEMPORARY.match(p.name)]   # from killed runs
    if overwrite:
        stale += [p for pattern in _OUTPUT_PATTERNS for p in folder.glob(pattern)]
    for path in stale:
        path.unlink(missing_ok=True)
    return status


def _save_png(image: torch.Tensor, path: Path) -> None:
    """Save an image in [-1, 1] as the reference does (clamped, ×255, rounded), atomically."""
    tmp = temporary_path(path)
    try:
        save_image((image.float().cpu() + 1) / 2, tmp, format="png")
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_best(folder: Path, best: BestImage) -> Path | None:
    """Write the best image; remove best images of earlier attempts of this run."""
    if best.image is None:
        return None
    path = folder / best.filename()
    _save_png(best.image, path)
    for old in folder.glob("out_img_best_t_*.png"):
        if old.name != path.name:
            old.unlink(missing_ok=True)
    return path


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("torchvision", "open_clip_torch", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def _resume_command(argv: list[str]) -> str:
    args = [a for a in argv if not _flag_given([a], "--overwrite")]
    if not _flag_given(args, "--resume"):
        args.append("--resume")
    return shlex.join(["python", sys.argv[0], *args])


class _StopOnSignals:
    """While active, SIGINT/SIGTERM ask the sampler to stop at the next iteration boundary (a
    second signal stops at once, without saving; the last periodic state stays). The previous
    handlers come back on exit. Only in the main thread (where Python delivers signals)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_SIGNAL:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler may run in the middle of another write to stderr.
        os.write(2, f"\n{signal.Signals(signum).name} received: stopping after the current "
                    "iteration to save the run (send it again to stop at once, without saving)\n"
                    .encode())

    def __call__(self) -> bool:
        return self.signum is not None


@dataclass
class _Job:
    """One target of this process: where it goes and what is known about it before sampling."""

    target: Target
    folder: Path
    status: str                          # of the folder before this run: new / interrupted
    fingerprint: dict | None = None
    state: SamplerState | None = None    # its resume state (a batch of one)
    saved: dict | None = None            # the bookkeeping saved with that state
    goal: torch.Tensor | None = None     # target features [1, ...]
    created: bool = False


def _extractor_source(extractor, args) -> tuple[str, Callable[[torch.device], FeatureExtractor], object]:
    """→ (name, build(device), the class or the parsed name) for a registry name or a class."""
    if isinstance(extractor, str):
        spec = extractor
        if args.layer:
            if "@" in spec:
                raise UsageError(f"--layer {args.layer!r}: the extractor {spec!r} already names a layer")
            spec = f"{spec}@{args.layer}"
        _check_spec(spec, args.spatial)
        return spec, lambda device: build_extractor(spec, weights=args.extractor_weights, device=device,
                                                    spatial=args.spatial), parse_spec(spec)
    if args.layer or args.spatial:
        raise UsageError(f"--layer/--spatial need an extractor from the registry; {extractor.name} is a "
                         "fixed class (use scripts/feature_guided.py --extractor <library:model@layer>)")
    return extractor.name, lambda device: extractor(weights=args.extractor_weights, device=device), extractor


def _check_spec(spec: str, spatial: bool) -> None:
    """Model and layer names, checked on the meta device before anything is read or loaded."""
    if parse_spec(spec).library == "toy":
        return   # small, and built from shipped files only
    with torch.device("meta"):
        build_extractor(spec, weights="random", device="meta", spatial=spatial)


def _target_list(args, text_only: bool) -> list[Target]:
    specs = [args.prompt] if isinstance(args.prompt, str) else list(args.prompt)   # a script default
    try:
        if args.prompt_file:
            specs += read_target_list(args.prompt_file)
        targets = expand_targets(specs, text_only)
        for target in targets:
            for kind, source in target.leaves():
                if kind == "image":
                    load_target_image(source)   # readable, before any model loads
        return targets
    except TargetError as err:
        raise UsageError(f"--prompt {err}") from None


def _plan(targets: list[Target], root: Path, args) -> tuple[list[_Job], list[str]]:
    """The targets left to do (folder status checked) and notes about skipped ones. One target:
    the folder is --optim_folder itself (the reference's layout) and a finished run is an
    error; several: a subfolder each, finished ones are skipped (a rerun does what is left)."""
    if len(targets) == 1:
        status, _ = folder_status(root) if root.is_dir() else ("new", "")
        return [_Job(targets[0], root, status)], []
    jobs, notes, blocked = [], [], []
    for target in targets:
        folder = root / target.label
        status, detail = folder_status(folder) if folder.is_dir() else ("new", "")
        if status == "finished" and not args.overwrite:
            notes.append(target.label)
            continue
        if status == "interrupted" and not (args.resume or args.overwrite):
            blocked.append(f"{folder} ({detail})")
        jobs.append(_Job(target, folder, status))
    if blocked:
        raise UsageError("interrupted runs of these targets: " + ", ".join(blocked) + "; pass --resume "
                         "to continue them (finished targets are skipped) or --overwrite to start again")
    return jobs, notes


def _check_same_targets(shard: Shard, targets: list[Target]) -> None:
    digest = hashlib.sha256(json.dumps([[t.kind, t.source] for t in targets]).encode()).hexdigest()
    digests = gather(shard, digest)
    different = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if different:
        raise UsageError(f"processes {different} of this torchrun job see other targets than process 0 "
                         "(different working directory, files or flags?)")


def run(extractor, args, *, text_only: bool = False, ckpt_hint: str = SD_V14_MISSING_HINT,
        argv: list[str] | None = None) -> list[dict]:
    """Everything after parsing: → the metrics of each target decoded by this process (also in
    each target's metrics.json). Raises `RunStopped` after saving an interrupted run (signal or
    numerical fault)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Every check that can run before a model loads does: flags, device, targets, config, files,
    # output folders, resume states.
    validate_flags(args)
    try:
        settings = settings_from_args(args)
        shard = current_shard()
    except ValueError as err:
        raise UsageError(str(err)) from err
    device = pick_device(shard.device(args.device))
    name, make_extractor, source = _extractor_source(extractor, args)
    targets = _target_list(args, text_only)
    wants_text = any(kind == "text" for t in targets for kind, _ in t.leaves())
    if wants_text and not _supports_text(source):
        raise UsageError(_text_refusal(targets, name))
    config = load_config(args.config)
    ddconfig = config.model.params.first_stage_config.params.ddconfig
    validate(args, 2 ** (len(ddconfig.ch_mult) - 1))
    check_weight_files(args, ckpt_hint)
    root = Path(args.optim_folder)
    created_group = init_group(shard, device)
    try:
        if shard.distributed:
            _check_same_targets(shard, targets)
        jobs, skipped = _plan(targets, root, args)
        labels = from_rank0(shard, [job.target.label for job in jobs])
        by_label = {job.target.label: job for job in jobs}
        jobs = [by_label[label] for label in shard.take(labels) if label in by_label]
        prefix = shard.prefix()
        if skipped:
            print(f"{prefix}skipping {len(skipped)} finished target(s) in {root} (pass --overwrite to "
                  f"decode them again): {', '.join(skipped)}")
        metrics = _run_jobs(jobs, len(targets) == 1, make_extractor, name, settings, device, args,
                            argv, ckpt_hint, prefix)
        barrier(shard)
        if len(targets) > 1 and shard.rank == 0:
            _write_index(root, targets)
        return metrics
    finally:
        leave_group(created_group)


def _supports_text(source) -> bool:
    """An extractor class, or a parsed registry name, takes text targets."""
    return source.supports_text() if isinstance(source, type) else source.supports_text


def _text_refusal(targets: list[Target], name: str) -> str:
    text = next(source for t in targets for kind, source in t.leaves() if kind == "text")
    return (f"--prompt {text!r} is not an image file, and {name} supports image targets only "
            "(text targets need a text tower, e.g. scripts/clip_guided2.py)")


def _run_jobs(jobs: list[_Job], single: bool, make_extractor, name: str, settings: GuidanceSettings,
              device: torch.device, args, argv: list[str], ckpt_hint: str,
              prefix: str) -> list[dict]:
    if not jobs:
        print(f"{prefix}nothing to decode")
        return []
    options = {"--precision": args.precision, "--loss": args.loss, "--channels": args.channels,
               "--spatial": args.spatial}
    for job in jobs:
        leaves = job.target.leaves()
        job.fingerprint = run_fingerprint(
            settings=settings, height=args.H, width=args.W, seed=args.seed, device=device.type,
            target_kind=job.target.kind, target=job.target.source, extractor=name,
            extractor_weights=args.extractor_weights, config=args.config, ckpt=args.ckpt,
            files=[source for kind, source in leaves if kind in ("image", "features")], options=options)
        job.created = not job.folder.exists()
        prepare_output_folder(job.folder, args.overwrite,
                              resume=args.resume and (single or job.status == "interrupted"))
    try:
        for job in jobs:
            if args.resume and job.status == "interrupted":
                job.state, job.saved = _load_resume_state(job, single)
        torch.manual_seed(args.seed)
        # The diffusion model first: a broken checkpoint fails before anything else is built.
        model = load_model(args.config, args.ckpt, device, missing_hint=ckpt_hint)
        extractor = make_extractor(device)   # text support was checked before anything loaded
        targets = TargetFeatures(extractor)
        for job in jobs:
            with warnings.catch_warnings(record=True) as caught, torch.no_grad():
                warnings.simplefilter("always")   # e.g. a text prompt truncated to CLIP's 77 tokens
                try:
                    job.goal = targets(job.target)
                except TargetError as err:
                    raise UsageError(f"--prompt {err}") from None
            for warning in caught:
                print(f"warning: {warning.message}", file=sys.stderr)
        if args.channels is not None:
            try:
                parse_channels(args.channels, jobs[0].goal.shape[1])
            except ValueError as err:
                raise UsageError(f"--channels: {err}") from None
        model, extractor = prepare(model, extractor, compile=args.compile,
                                   grad_checkpoint=args.grad_checkpoint)
        decoder = FeatureDecoder(model, extractor, settings, loss=args.loss, channels=args.channels,
                                 precision=args.precision)
    except BaseException:
        for job in jobs:   # a broken checkpoint leaves no empty output folders behind
            if job.created and job.folder.is_dir() and not any(job.folder.iterdir()):
                job.folder.rmdir()
        raise

    # Resumed targets continue in batches of the same position; new ones start together.
    groups: dict[tuple, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(position(job.state) if job.state is not None else (), []).append(job)
    batches = [group[i:i + args.batch_size] for key in sorted(groups, key=lambda k: k == ())
               for group in [groups[key]] for i in range(0, len(group), args.batch_size)]
    metrics = []
    with _StopOnSignals() as stop:
        for n, batch in enumerate(batches):
            if len(batches) > 1:
                print(f"{prefix}batch {n + 1} of {len(batches)}: {', '.join(j.target.label for j in batch)}")
            metrics += _decode_batch(batch, decoder, settings, device, args, argv, stop, prefix)
    return metrics


def _load_resume_state(job: _Job, single: bool) -> tuple[SamplerState, dict]:
    try:
        state, saved = load_state(job.folder / STATE_FILE)
    except RunStateError as err:
        raise UsageError(f"cannot resume: {err} (pass --overwrite instead of --resume to start "
                         "again)") from err
    differences = fingerprint_differences(saved["fingerprint"], job.fingerprint)
    if differences:
        where = "" if single else f" {job.folder}"
        raise UsageError(f"cannot resume{where}: " + "; ".join(differences) + " (resume with the "
                         "original flags, or pass --overwrite instead of --resume to start again)")
    if len(state.best) != 1:
        raise UsageError(f"cannot resume {job.folder}: its resume state holds {len(state.best)} "
                         "targets, not one (pass --overwrite to start again)")
    return state, saved


def _decode_batch(jobs: list[_Job], decoder: FeatureDecoder, settings: GuidanceSettings,
                  device: torch.device, args, argv: list[str], stop: "_StopOnSignals",
                  prefix: str) -> list[dict]:
    """Decode one batch of targets; write each target's files. → their metrics."""
    model, extractor = decoder.model, decoder.extractor
    total = settings.total_iterations(model.num_timesteps)
    save_every = args.save_every or max(1, round(0.05 * total))
    resumed = jobs[0].state is not None
    state = stack_states([job.state for job in jobs]) if resumed else None
    goals = torch.cat([job.goal for job in jobs])
    resume_command = _resume_command(argv)
    books = []   # per target: what the first run recorded (argv, options, time, resumes)
    for job in jobs:
        if job.saved is None:
            books.append({"argv": argv, "options": str(args), "elapsed": 0.0, "resumes": []})
        else:
            books.append({"argv": job.saved["argv"], "options": job.saved["run_options"],
                          "elapsed": job.saved["elapsed_s"],
                          "resumes": [*job.saved["resumes"], {"at_iteration": job.state.iterations,
                                                               "argv": argv}]})
            _truncate_log(job.folder / "log.txt", job.saved["log_bytes"])
        _save_features(job)

    def reloaded(path: Path, goal: torch.Tensor) -> dict:
        """What a reader of the saved figure measures: reload the PNG, standard preprocessing."""
        with torch.no_grad():
            features = extractor.image_features(load_target_image(str(path)))
        distance, cosine = decoder.targets.compare(features, goal, args.channels)
        return {"squared_distance": float(distance[0]), "cosine": float(cosine[0])}

    def best_entry(best: BestImage, path: Path | None, goal: torch.Tensor) -> dict | None:
        if path is None:
            return None
        distance, _ = decoder.measure(best.image[None], goal) if args.loss != "squared" else (None, None)
        return {"file": path.name, "t": best.t, "rec": best.rec, "bk": best.bk,
                "loss": best.distance,
                "squared_distance": best.distance if distance is None else float(distance[0]),
                "cosine": best.cosine, "reloaded_png": reloaded(path, goal)}

    def metrics_of(b: int, finished: bool, iterations: int, guards: int, elapsed: float) -> dict:
        job = jobs[b]
        return {
            "finished": finished,
            "target": {"kind": job.target.kind, "source": job.target.source, "label": job.target.label},
            "extractor": extractor.name,
            "feature_shape": list(job.goal.shape[1:]),
            "objective": {"loss": args.loss, "channels": args.channels, "spatial": args.spatial},
            "model": {"config": args.config, "ckpt": args.ckpt},
            "settings": asdict(settings),
            "seed": args.seed, "device": str(device), "precision": args.precision,
            "image_size": [args.H, args.W], "batch_size": len(jobs),
            "iterations": iterations, "total_iterations": total, "wall_time_s": elapsed,
            "guidance_gradient_guards": guards,
        }

    with ExitStack() as files:
        logs = [files.enter_context(open(job.folder / "log.txt", "a" if job.saved else "w",
                                         buffering=1, encoding="utf-8")) for job in jobs]

        def log(b: int, line: str) -> None:
            logs[b].write(line + "\n")

        def save_intermediate(b: int, name: str, image: torch.Tensor) -> None:
            _save_png(image, jobs[b].folder / name)

        def elapsed(b: int) -> float:
            return books[b]["elapsed"] + time.perf_counter() - start

        def write_state(state: SamplerState, reason: str) -> None:
            for b, (job, part) in enumerate(zip(jobs, split_state(state))):
                logs[b].flush()
                os.fsync(logs[b].fileno())
                save_state(job.folder / STATE_FILE, part, {
                    "fingerprint": job.fingerprint, "log_bytes": (job.folder / "log.txt").stat().st_size,
                    "argv": books[b]["argv"], "run_options": books[b]["options"],
                    "elapsed_s": elapsed(b), "resumes": books[b]["resumes"], "reason": reason,
                    "total_iterations": total, "resume_command": resume_command})

        def save_unfinished(state: SamplerState, stopped: dict, log_line: str) -> list[dict]:
            """State, best image so far, a log line and metrics.json (finished: false), per target."""
            write_state(state, stopped["reason"])
            out = []
            for b, job in enumerate(jobs):
                logs[b].write(log_line + "\n")
                logs[b].flush()
                best = state.best[b]
                metrics = metrics_of(b, False, state.iterations, state.guard_events, elapsed(b))
                metrics.update({
                    "stopped": {**stopped, "timestep": state.timestep, "self_recurrence": state.j,
                                "iterations_done": state.iterations},
                    "resume_state": STATE_FILE, "resume_command": resume_command,
                    "best": best_entry(best, _save_best(job.folder, best), job.goal),
                    "versions": _versions(), "argv": books[b]["argv"], "resumes": books[b]["resumes"]})
                atomic_write_text(job.folder / "metrics.json", json.dumps(metrics, indent=2))
                out.append(metrics)
            return out

        what = (f"{jobs[0].target.kind} target {jobs[0].target.source!r}" if len(jobs) == 1
                else f"{len(jobs)} targets")
        where = jobs[0].folder if len(jobs) == 1 else jobs[0].folder.parent
        print(f"{prefix}{'Resuming' if resumed else 'Decoding'} {what} with {extractor.name}: "
              f"{total} guided iterations on {device}; outputs in {where}")
        if resumed:
            print(f"{prefix}resuming before timestep {state.timestep}, self-recurrence {state.j} "
                  f"({state.iterations} of {total} iterations done)")
        start = time.perf_counter()
        try:
            result = decoder.decode_batch(
                goals, args.H, args.W, [args.seed] * len(jobs), log=log,
                on_intermediate=save_intermediate, progress=not args.no_progress, state=state,
                on_checkpoint=lambda st: write_state(st, "periodic"), checkpoint_every=save_every,
                should_stop=stop)
        except SamplingStopped as stopped:
            name = signal.Signals(stop.signum).name
            at = stopped.state
            saved = save_unfinished(at, {"reason": name}, f"Interrupted by {name} before timestep "
                                    f"{at.timestep}, {at.j}th self-recurrence")
            best = (f"best image so far: {saved[0]['best']['file']}, "
                    if len(jobs) == 1 and saved[0]["best"] else "")
            raise RunStopped(
                f"stopped by {name} before timestep {at.timestep}, self-recurrence {at.j} "
                f"({at.iterations} of {total} iterations done). Saved in {where}: {best}log.txt, "
                f"metrics.json (finished: false) and {STATE_FILE}.\nTo resume:\n  {resume_command}",
                EXIT_SIGNAL[stop.signum]) from None
        except NumericalFault as fault:
            saved = save_unfinished(fault.state, {"reason": "numerical fault", "stage": fault.stage,
                                                  "message": str(fault)}, f"Numerical fault: {fault}")
            best = (f"the best image so far ({saved[0]['best']['file']}), "
                    if len(jobs) == 1 and saved[0]["best"] else "")
            raise RunStopped(
                f"{fault}. The run was stopped rather than writing images of NaNs; kept in {where}: "
                f"{best}log.txt, metrics.json (finished: false) and the resume state of the start "
                f"of that iteration ({STATE_FILE}; `--resume` recomputes that iteration, so on the "
                "same device it will most likely fail the same way).", EXIT_NUMERICAL_FAULT) from None
        for b in range(len(jobs)):
            logs[b].write(f"Elapsed time = {elapsed(b)} sec\n")
            logs[b].write(f"Run options: {books[b]['options']}\n")
        done = [elapsed(b) for b in range(len(jobs))]

    out = []
    squared = None if args.loss == "squared" else decoder.measure(result.final_images, goals)[0]
    for b, job in enumerate(jobs):
        best = result.best[b]
        final_path = job.folder / "out_img.png"
        _save_png(result.final_images[b], final_path)
        best_path = _save_best(job.folder, best)
        metrics = metrics_of(b, True, result.iterations, result.guard_events, done[b])
        metrics.update({
            "final": {"file": final_path.name, "loss": float(result.final_distance[b]),
                      "squared_distance": float((result.final_distance if squared is None else squared)[b]),
                      "cosine": float(result.final_cosine[b]),
                      "reloaded_png": reloaded(final_path, job.goal)},
            "best": best_entry(best, best_path, job.goal),
            "versions": _versions(),
            "argv": books[b]["argv"],
            "resumes": books[b]["resumes"],
        })
        atomic_write_text(job.folder / "metrics.json", json.dumps(metrics, indent=2))
        (job.folder / STATE_FILE).unlink(missing_ok=True)   # finished: nothing left to resume
        label = "" if len(jobs) == 1 else f"{job.target.label}: "
        print(f"{prefix}{label}final: squared distance {metrics['final']['squared_distance']:.6g}, "
              f"cosine {metrics['final']['cosine']:.4f} -> {final_path}")
        if best_path is not None:
            print(f"{prefix}{label}best:  squared distance {metrics['best']['squared_distance']:.6g}, "
                  f"cosine {best.cosine:.4f} -> {best_path}")
        out.append(metrics)
    return out


def _save_features(job: _Job) -> None:
    """The target's features, reusable as a target (`--prompt <folder>/target_features.safetensors`)."""
    path = job.folder / "target_features.safetensors"
    tmp = temporary_path(path)
    try:
        save_file({"features": job.goal[0].detach().float().cpu().contiguous()}, str(tmp),
                  metadata={"target": json.dumps({"kind": job.target.kind, "source": job.target.source})})
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_index(root: Path, targets: list[Target]) -> None:
    """index.json of a multi-target run: every target, its folder and its outcome."""
    entries = []
    for target in targets:
        folder = root / target.label
        status, _ = folder_status(folder) if folder.is_dir() else ("new", "")
        entry = {"label": target.label, "kind": target.kind, "source": target.source,
                 "folder": target.label, "status": status}
        if status == "finished" and (folder / "metrics.json").is_file():
            try:
                metrics = json.loads((folder / "metrics.json").read_text())
                entry["final"] = {k: metrics["final"][k] for k in ("squared_distance", "cosine")}
            except (ValueError, KeyError, TypeError):
                pass
        entries.append(entry)
    atomic_write_text(root / "index.json", json.dumps({"targets": entries}, indent=2))


def _truncate_log(path: Path, length: int) -> None:
    """Cut log.txt back to its length when the state was saved, dropping the lines of the
    iterations that will be recomputed (so the finished log equals an uninterrupted run's)."""
    size = path.stat().st_size if path.is_file() else 0
    if size < length:
        print(f"warning: {path} is shorter ({size} bytes) than when the resume state was saved "
              f"({length} bytes); its earlier lines are missing", file=sys.stderr)
        return
    os.truncate(path, length)



def main(extractor: str | type[FeatureExtractor] | dict | None = None, *, description: str | None = None,
         defaults: dict | None = None, text_only: bool = False, ckpt_hint: str = SD_V14_MISSING_HINT,
         argv: list[str] | None = None) -> int:
    """The whole command line of a script. `extractor`: a registry name
    ("torchvision:resnet50"), an extractor class, a dict name → either (adds an `--extractor`
    flag choosing among them, the first is the default), or None (adds a required
    `--extractor` taking any registry name). → the exit code (0 finished, 2 bad input, 3
    numerical fault, 130/143 stopped by SIGINT/SIGTERM with the run saved)."""
    choices = extractor if isinstance(extractor, dict) else None
    if extractor is None:
        title = "any registered"
    elif choices:
        title = "/".join(choices)
    else:
        title = extractor if isinstance(extractor, str) else extractor.name
    parser = build_parser(description or f"Decode a {title} feature into images with "
                          "feature-guided latent diffusion.", defaults)
    if choices:
        parser.add_argument("--extractor", choices=list(choices), default=next(iter(choices)),
                            help="target model whose feature is decoded")
    elif extractor is None:
        parser.add_argument("--extractor", required=True,
                            help="target model: library:model[@layer], e.g. torchvision:resnet50, "
                                 "torchvision:resnet50@layer3, open_clip:RN50, timm:convnext_tiny")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    chosen = choices[args.extractor] if choices else (args.extractor if extractor is None else extractor)
    try:
        run(chosen, args, text_only=text_only, ckpt_hint=ckpt_hint, argv=argv)
    except (UsageError, FileNotFoundError, CheckpointError, TextTargetNotSupported, ExtractorSpecError,
            TargetError) as err:
        # Expected user-facing errors (bad flags or inputs, missing or broken weights): no traceback.
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunStopped as stopped:
        print(("error: " if stopped.exit_code == EXIT_NUMERICAL_FAULT else "") + str(stopped),
              file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        state = Path(args.optim_folder) / STATE_FILE
        kept = (f"; the last periodic resume state is kept in {state} (continue with --resume)"
                if state.is_file() else "")
        print(f"\ninterrupted{kept}", file=sys.stderr)
        return EXIT_SIGNAL[signal.SIGINT]
    return 0
