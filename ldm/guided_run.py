"""The command line shared by every per-model script (`scripts/*_guided.py`).

A script is its extractor class plus one call: `main(ResNet50Extractor)`. This module parses the
reference's flags, checks them before any model loads, resolves the target (image or text),
runs the guided sampler and writes the outputs the reference writes (`out_img.png`, the best
image, intermediates with `--optim_print`, `log.txt`), plus `metrics.json`.

Runs survive interruption: the resume state (ldm/run_state.py) is written every `--save_every`
iterations and on SIGINT/SIGTERM, `--resume` continues bit for bit, a folder holding a finished
or interrupted run is never clobbered without `--overwrite`, every image and JSON file is
written atomically, and a NaN/inf stops the run keeping the best image and the state.

Exit codes: 0 finished, 2 bad input (message, no traceback), 3 numerical fault, 130 / 143
stopped by SIGINT / SIGTERM (state saved).
"""
from __future__ import annotations

import argparse
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
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.utils import save_image

from ldm.checkpoint import CheckpointError, CheckpointNotFoundError
from ldm.extractors.base import FeatureExtractor, TextTargetNotSupported, to_rgb
from ldm.models.diffusion.feature_guidance import (BestImage, GuidanceSettings, NumericalFault,
                                                   SamplerState, SamplingStopped,
                                                   sample_feature_guided)
from ldm.objectives import FeatureDistance, squared_distance
from ldm.models.loading import (DEFAULT_CKPT, DEFAULT_CONFIG, SD_V14_MISSING_HINT, load_config,
                                load_model)
from ldm.run_state import (STATE_FILE, RunStateError, atomic_write_text, commit,
                           fingerprint_differences, folder_status, load_state, peek_run,
                           run_fingerprint, save_state, temporary_path)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

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
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a folder that holds a finished or interrupted run (its outputs are deleted)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --optim_folder from its resume state (same flags)")
    p.add_argument("--save_every", type=int, default=None,
                   help="write the resume state every N guided iterations (default: 5%% of the run's iterations)")
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
    """The target image, fully read and checked to convert to RGB (any mode, 16-bit, EXIF)."""
    try:
        with Image.open(path) as image:
            image.load()
            image = image.copy()
        to_rgb(image)
        return image
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise UsageError(f"--prompt {path!r} is not a readable image: {err}") from err


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
    if args.extractor_weights is not None and not Path(args.extractor_weights).is_file():
        raise UsageError(f"--extractor_weights {args.extractor_weights!r}: no such file")


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


def run(extractor_cls: type[FeatureExtractor], args, *, text_only: bool = False,
        ckpt_hint: str = SD_V14_MISSING_HINT, argv: list[str] | None = None) -> dict:
    """Everything after parsing: → the metrics dict (also written to metrics.json). Raises
    `RunStopped` after saving an interrupted run (signal or numerical fault)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Every check that can run before a model loads does: flags, device, target, config, files,
    # output folder, resume state.
    validate_flags(args)
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from err
    device = pick_device(args.device)
    kind, target = resolve_target(args.prompt, text_only)
    if kind == "text" and not extractor_cls.supports_text():
        raise UsageError(f"--prompt {args.prompt!r} is not an image file, and {extractor_cls.name} "
                         "supports image targets only (text targets: scripts/clip_guided2.py)")
    target_image = load_target_image(target) if kind == "image" else None
    config = load_config(args.config)
    ddconfig = config.model.params.first_stage_config.params.ddconfig
    latent_factor = 2 ** (len(ddconfig.ch_mult) - 1)
    validate(args, latent_factor)
    check_weight_files(args, ckpt_hint)
    folder = Path(args.optim_folder)
    fingerprint = run_fingerprint(
        settings=settings, height=args.H, width=args.W, seed=args.seed, device=device.type,
        target_kind=kind, target=target, extractor=extractor_cls.name,
        extractor_weights=args.extractor_weights, config=args.config, ckpt=args.ckpt)
    created = not folder.exists()
    prepare_output_folder(folder, args.overwrite, resume=args.resume)
    try:
        state, saved = None, None
        if args.resume:
            try:
                state, saved = load_state(folder / STATE_FILE)
            except RunStateError as err:
                raise UsageError(f"cannot resume: {err} (pass --overwrite instead of --resume to "
                                 "start again)") from err
            differences = fingerprint_differences(saved["fingerprint"], fingerprint)
            if differences:
                raise UsageError("cannot resume: " + "; ".join(differences) + " (resume with the "
                                 "original flags, or pass --overwrite instead of --resume to start "
                                 "again)")
        torch.manual_seed(args.seed)
        model = load_model(args.config, args.ckpt, device, missing_hint=ckpt_hint)
        extractor = extractor_cls(weights=args.extractor_weights, device=device)
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()   # a broken checkpoint leaves no empty output folder behind
        raise
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")   # e.g. a text prompt truncated to CLIP's 77 tokens
        goal = (extractor.image_features(target_image) if kind == "image"
                else extractor.encode_text([target]).float())
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    objective = FeatureDistance(extractor, goal)
    with torch.no_grad():
        cond = model.get_learned_conditioning([""])

    total = settings.total_iterations(model.num_timesteps)
    save_every = args.save_every or max(1, round(0.05 * total))
    shape = (1, model.channels, args.H // latent_factor, args.W // latent_factor)
    generator = torch.Generator(device).manual_seed(args.seed)
    if saved is None:
        first_argv, options, elapsed_before, resumes = argv, str(args), 0.0, []
    else:
        first_argv, options, elapsed_before = saved["argv"], saved["run_options"], saved["elapsed_s"]
        resumes = [*saved["resumes"], {"at_iteration": state.iterations, "argv": argv}]
    resume_command = _resume_command(argv)
    state_path, log_path = folder / STATE_FILE, folder / "log.txt"
    if saved is not None:
        _truncate_log(log_path, saved["log_bytes"])

    def reloaded(path: Path) -> dict:
        """What a reader of the saved figure measures: reload the PNG, standard preprocessing."""
        with torch.no_grad():
            features = extractor.image_features(load_target_image(str(path)))
        return {"squared_distance": float(squared_distance(features, goal)[0]),
                "cosine": float(torch.nn.functional.cosine_similarity(features, goal)[0])}

    def best_entry(best: BestImage, path: Path | None) -> dict | None:
        if path is None:
            return None
        return {"file": path.name, "t": best.t, "rec": best.rec, "bk": best.bk,
                "squared_distance": best.distance, "cosine": best.cosine,
                "reloaded_png": reloaded(path)}

    def metrics_of(finished: bool, iterations: int, guards: int, elapsed: float) -> dict:
        return {
            "finished": finished,
            "target": {"kind": kind, "source": target},
            "extractor": extractor.name,
            "feature_dim": int(goal.shape[-1]),
            "model": {"config": args.config, "ckpt": args.ckpt},
            "settings": asdict(settings),
            "seed": args.seed, "device": str(device), "image_size": [args.H, args.W],
            "iterations": iterations, "total_iterations": total, "wall_time_s": elapsed,
            "guidance_gradient_guards": guards,
        }

    with open(log_path, "a" if saved is not None else "w", buffering=1, encoding="utf-8") as log_file:
        def log(b: int, line: str) -> None:
            log_file.write(line + "\n")

        def save_intermediate(b: int, name: str, image: torch.Tensor) -> None:
            _save_png(image, folder / name)

        def write_state(state: SamplerState, reason: str) -> None:
            log_file.flush()
            os.fsync(log_file.fileno())
            save_state(state_path, state, {
                "fingerprint": fingerprint, "log_bytes": log_path.stat().st_size, "argv": first_argv,
                "run_options": options, "elapsed_s": elapsed_before + time.perf_counter() - start,
                "resumes": resumes, "reason": reason, "total_iterations": total,
                "resume_command": resume_command})

        def save_unfinished(state: SamplerState, stopped: dict, log_line: str) -> dict:
            """State, best image so far, a log line and metrics.json (finished: false)."""
            write_state(state, stopped["reason"])
            log_file.write(log_line + "\n")
            log_file.flush()
            best = state.best[0]
            metrics = metrics_of(False, state.iterations, state.guard_events,
                                 elapsed_before + time.perf_counter() - start)
            metrics.update({
                "stopped": {**stopped, "timestep": state.timestep, "self_recurrence": state.j,
                            "iterations_done": state.iterations},
                "resume_state": STATE_FILE, "resume_command": resume_command,
                "best": best_entry(best, _save_best(folder, best)),
                "versions": _versions(), "argv": first_argv, "resumes": resumes})
            atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
            return metrics

        verb = "Resuming" if state is not None else "Decoding"
        print(f"{verb} {kind} target {target!r} with {extractor.name}: {total} guided iterations "
              f"on {device}; outputs in {folder}")
        if state is not None:
            print(f"resuming before timestep {state.timestep}, self-recurrence {state.j} "
                  f"({state.iterations} of {total} iterations done)")
        start = time.perf_counter()
        stop = _StopOnSignals()
        try:
            with stop:
                result = sample_feature_guided(
                    model, cond, objective, settings, shape, [generator], log=log,
                    on_intermediate=save_intermediate, log_cosine=extractor.log_cosine,
                    progress=not args.no_progress, state=state,
                    on_checkpoint=lambda st: write_state(st, "periodic"),
                    checkpoint_every=save_every, should_stop=stop)
        except SamplingStopped as stopped:
            name = signal.Signals(stop.signum).name
            at = stopped.state
            metrics = save_unfinished(at, {"reason": name}, f"Interrupted by {name} before timestep "
                                      f"{at.timestep}, {at.j}th self-recurrence")
            best = f"best image so far: {metrics['best']['file']}, " if metrics["best"] else ""
            raise RunStopped(
                f"stopped by {name} before timestep {at.timestep}, self-recurrence {at.j} "
                f"({at.iterations} of {total} iterations done). Saved in {folder}: {best}log.txt, "
                f"metrics.json (finished: false) and {STATE_FILE}.\nTo resume:\n  {resume_command}",
                EXIT_SIGNAL[stop.signum]) from None
        except NumericalFault as fault:
            metrics = save_unfinished(fault.state, {"reason": "numerical fault", "stage": fault.stage,
                                                    "message": str(fault)},
                                      f"Numerical fault: {fault}")
            best = f"the best image so far ({metrics['best']['file']}), " if metrics["best"] else ""
            raise RunStopped(
                f"{fault}. The run was stopped rather than writing images of NaNs; kept in {folder}: "
                f"{best}log.txt, metrics.json (finished: false) and the resume state of the start "
                f"of that iteration ({STATE_FILE}; `--resume` recomputes that iteration, so on the "
                "same device it will most likely fail the same way).", EXIT_NUMERICAL_FAULT) from None
        elapsed = elapsed_before + time.perf_counter() - start
        log_file.write(f"Elapsed time = {elapsed} sec\n")
        log_file.write(f"Run options: {options}\n")

    best = result.best[0]
    final_path = folder / "out_img.png"
    _save_png(result.final_images[0], final_path)
    best_path = _save_best(folder, best)
    metrics = metrics_of(True, result.iterations, result.guard_events, elapsed)
    metrics.update({
        "final": {"file": final_path.name,
                  "squared_distance": float(result.final_distance[0]),
                  "cosine": float(result.final_cosine[0]),
                  "reloaded_png": reloaded(final_path)},
        "best": best_entry(best, best_path),
        "versions": _versions(),
        "argv": first_argv,
        "resumes": resumes,
    })
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
    state_path.unlink(missing_ok=True)   # the run is finished: nothing left to resume
    print(f"final: squared distance {metrics['final']['squared_distance']:.6g}, cosine "
          f"{metrics['final']['cosine']:.4f} -> {final_path}")
    print(f"best:  squared distance {best.distance:.6g}, cosine {best.cosine:.4f} -> {best_path}")
    return metrics


def _truncate_log(path: Path, length: int) -> None:
    """Cut log.txt back to its length when the state was saved, dropping the lines of the
    iterations that will be recomputed (so the finished log equals an uninterrupted run's)."""
    size = path.stat().st_size if path.is_file() else 0
    if size < length:
        print(f"warning: {path} is shorter ({size} bytes) than when the resume state was saved "
              f"({length} bytes); its earlier lines are missing", file=sys.stderr)
        return
    os.truncate(path, length)


def main(extractor: type[FeatureExtractor] | dict[str, type[FeatureExtractor]], *,
         description: str | None = None, defaults: dict | None = None, text_only: bool = False,
         ckpt_hint: str = SD_V14_MISSING_HINT, argv: list[str] | None = None) -> int:
    """The whole command line of a per-model script. `extractor` is one extractor class, or a
    dict name → class, which adds an `--extractor` flag choosing among them (the first is the
    default). → the exit code (0 finished, 2 bad input, 3 numerical fault, 130/143 stopped by
    SIGINT/SIGTERM with the run saved)."""
    choices = extractor if isinstance(extractor, dict) else None
    title = "/".join(choices) if choices else extractor.name
    parser = build_parser(description or f"Decode a {title} feature into images with "
                          "feature-guided latent diffusion.", defaults)
    if choices:
        parser.add_argument("--extractor", choices=list(choices), default=next(iter(choices)),
                            help="target model whose feature is decoded")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    extractor_cls = choices[args.extractor] if choices else extractor
    try:
        run(extractor_cls, args, text_only=text_only, ckpt_hint=ckpt_hint, argv=argv)
    except (UsageError, FileNotFoundError, CheckpointError, TextTargetNotSupported) as err:
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
