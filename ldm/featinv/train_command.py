r"""Training a FeatInv decoder with PyTorch Lightning (the driver of scripts/train_featinv.py).

    python scripts/train_featinv.py --extractor torchvision:resnet50@layer4 --spatial \
        --data /imagenet/train --base configs/stable-diffusion/minisd-inference.yaml \
        --ckpt miniSD.ckpt --out runs/rn50

Defaults are FeatInv's recipe (AdamW, lr 1e-5, batch 8, 3 epochs, hint dropout 0.15); bf16 on
CUDA; only the ControlNet trains, or with `--sd_locked false` the UNet's decoder half too. The
run's folder DIR receives Lightning's resumable `last.ckpt` (the trained weights, their EMA and
the optimizer only), its CSV logs `log/version_N/metrics.csv` (train/loss, val/cosine; one
version per start, as Lightning does), validation images `val/step_N.png`, the file list
`files.txt` (rank 0 walks --data once), and, every --export_every steps and at the end,
`decoder.safetensors` (the exported trained weights, `control_model.*` and unlocked the UNet's
`model.diffusion_model.output_blocks.*` and `.out.*`, with the decoder's record in the
metadata), then `decoder.json` (the record, the options and a summary). Flags are checked
before any model loads.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.checkpoint import CheckpointError
from ldm.errors import InputError
from ldm.extractors import ExtractorSpecError, build_extractor, check_spec, parse_spec
from ldm.extractors.preprocessing import Preprocessing
from ldm.featinv.data import ImageFolderPairs, ToyWorldPairs, list_images, skip_unreadable
from ldm.featinv.decoder import (FEATINV_PROMPT, MAX_HIDDEN_CHANNELS, DecoderRecord,
                                 ResumeMismatchError, new_decoder, save_decoder)
from ldm.featinv.checkpoint_io import SafeCheckpointIO, SaveOnSigterm
from ldm.featinv.hints import hint_shape
from ldm.files import DISK_FULL, atomic_write_text
from ldm.featinv.lightning_module import TIMESTEP_SCHEDULES, FeatInvTraining
from ldm.models.diffusion.controlled_ddpm import LATENT_DIFFUSION
from ldm.models.loading import load_config
from ldm.paths import ROOT

TOY_DATA = "toy"
TOY_TRAIN_SEED, TOY_VAL_SEED = 40, 41   # no other toy data set uses these
LAST = "last.ckpt"
DECODER = "decoder.safetensors"
FILE_LIST = "files.txt"
PRECISIONS = ("auto", "32", "32-true", "bf16-mixed", "16-mixed")


class UsageError(Exception):
    """A bad flag or input, printed without a traceback."""


class TrainingStopped(Exception):
    """SIGTERM stopped the training after saving last.ckpt."""


@dataclass
class TrainOptions:
    """Everything a training run needs (the command line's flags)."""

    extractor: str
    data: str
    base: str
    ckpt: str
    out: str
    spatial: bool = False
    extractor_weights: str | None = None
    hint_hidden_channels: int = 512
    lr: float = 1e-5
    lr_schedule: str = "constant"
    timesteps: str = "uniform"
    ema_decay: float | None = None
    warmup_steps: int = 0
    batch_size: int = 8
    accumulate: int = 1
    grad_clip: float | None = None
    grad_checkpoint: bool = False
    sd_locked: bool = True
    epochs: int = 3
    max_steps: int = -1
    toy_images: int = 20000
    val_data: str | None = None
    val_images: int = 4
    val_every: int = 1000
    val_steps: int = 20
    checkpoint_every: int = 1000
    export_every: int = 5000
    log_every: int = 50
    workers: int = -1
    benchmark_loader: int = 0
    devices: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    precision: str = "auto"
    resume: bool = False
    seed: int = 0
    progress: bool = True


# Integer flags and their help (the defaults are TrainOptions').
INT_FLAGS = {
    "hint_hidden_channels": "width of the hint block (FeatInv: 512)",
    "batch_size": "images per step and device (FeatInv: 8)",
    "accumulate": "accumulate the gradients of this many batches per optimizer step",
    "warmup_steps": "linear learning-rate warm-up over this many steps",
    "epochs": "passes over the data (FeatInv: 3 of ImageNet)",
    "max_steps": "stop after this many steps (-1: after --epochs)",
    "toy_images": f"size of the generated training set with --data {TOY_DATA}",
    "val_images": "held-out images to validate on (without --val_data: taken from the "
                  "training folder, spread over its classes)",
    "val_every": "validate every this many steps (DDIM samples of the held-out images)",
    "val_steps": "DDIM steps of the validation samples",
    "checkpoint_every": f"write DIR/{LAST} every this many steps (and at the end)",
    "export_every": f"write DIR/{DECODER} every this many steps (and at the end)",
    "log_every": "log the training loss every this many steps",
    "workers": "data-loader worker processes per device (-1: the machine's cores / devices, "
               "at most 8)",
    "benchmark_loader": "only time this many batches of the training loader, print images/s "
                        "and exit (to size --workers)",
    "devices": "devices (processes) to train on",
    "seed": "seed of everything random (Lightning's seed_everything)",
}


def parse_args(argv=None) -> TrainOptions:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainOptions("", "", "", "", "")
    p.add_argument("--extractor", required=True, help="registry spec library:model[@layer]")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--spatial", action="store_true", help="decode the layer's spatial map")
    kind.add_argument("--pooled", dest="spatial", action="store_false",
                      help="decode the pooled vector, copied to every position (default)")
    p.add_argument("--extractor_weights", default=None, help="build_extractor's weights")
    p.add_argument("--data", required=True, help=f"an image folder, or '{TOY_DATA}'")
    p.add_argument("--base", required=True, help="the frozen base LDM's config (YAML), "
                   "or its diffusers folder (then also its --ckpt)")
    p.add_argument("--ckpt", required=True, help="the base LDM's weights (.ckpt, "
                   ".safetensors or a diffusers folder)")
    p.add_argument("--out", required=True, help="the run's folder (DIR)")
    for name, text in INT_FLAGS.items():
        p.add_argument(f"--{name}", type=int, default=getattr(d, name),
                       help=f"{text} (default {getattr(d, name)})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW's learning rate (default {d.lr})")
    p.add_argument("--lr_schedule", default=d.lr_schedule, choices=["constant", "cosine"],
                   help="constant (FeatInv) or a half-cosine decay to 0 over the run")
    p.add_argument("--timesteps", default=d.timesteps, choices=list(TIMESTEP_SCHEDULES),
                   help="training timesteps: uniform (FeatInv) or cubic (T2I-Adapter: more "
                        "weight on the noisy end)")
    p.add_argument("--ema_decay", type=float, default=d.ema_decay,
                   help="keep an EMA of the trained weights with this decay (e.g. 0.999) "
                        "and export it as the decoder (default: none, the last weights)")
    p.add_argument("--grad_clip", type=float, default=d.grad_clip,
                   help="clip the gradients' norm to this (default: no clipping)")
    p.add_argument("--grad_checkpoint", action="store_true",
                   help="gradient checkpointing of the UNet and ControlNet blocks (FeatInv's "
                        "use_checkpoint: less memory, about a third more compute)")
    p.add_argument("--sd_locked", type=true_or_false, default=d.sd_locked, metavar="{true,false}",
                   help="false: the UNet's decoder half (output_blocks, out) trains beside the "
                        "ControlNet (FeatInv's and ControlNet's sd_locked; default true: frozen)")
    p.add_argument("--val_data", default=None,
                   help="a folder of held-out images (default: --val_images of --data, "
                        "spread over its classes, kept out of training)")
    p.add_argument("--accelerator", default=d.accelerator, choices=["auto", "cpu", "gpu", "cuda"])
    p.add_argument("--strategy", default=d.strategy, choices=["auto", "ddp"],
                   help="ddp: one process per device (gloo on CPUs, NCCL on GPUs)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="Lightning's precision (default auto: bf16-mixed on CUDA, with TF32 "
                        "matmuls, else 32)")
    p.add_argument("--resume", action="store_true", help=f"continue from DIR/{LAST}")
    p.add_argument("--no_progress", dest="progress", action="store_false",
                   help="no progress bar")
    return TrainOptions(**vars(p.parse_args(argv)))


def true_or_false(text: str) -> bool:
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"true or false, not {text!r}")
    return text == "true"


def check_options(opts: TrainOptions) -> None:
    """UsageError for anything wrong with the flags, before a model is loaded."""
    positive = ("hint_hidden_channels", "batch_size", "accumulate", "epochs", "toy_images",
                "val_images", "val_every", "val_steps", "checkpoint_every", "export_every",
                "log_every", "devices")
    for name in positive:
        if getattr(opts, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(opts, name)}")
    if opts.warmup_steps < 0 or opts.benchmark_loader < 0:
        raise UsageError("--warmup_steps and --benchmark_loader must be at least 0")
    if opts.grad_clip is not None and opts.grad_clip <= 0:
        raise UsageError(f"--grad_clip must be > 0, got {opts.grad_clip}")
    if opts.ema_decay is not None and not 0 < opts.ema_decay < 1:
        raise UsageError(f"--ema_decay must be between 0 and 1, got {opts.ema_decay}")
    if not 0 < opts.lr < float("inf"):
        raise UsageError(f"--lr {opts.lr}: must be a finite number > 0 (FeatInv: 1e-5)")
    if opts.workers < -1 or not (opts.max_steps == -1 or opts.max_steps >= 1):
        raise UsageError("--workers must be >= 0 (or -1: automatic), --max_steps >= 1 (or -1: epochs)")
    if opts.hint_hidden_channels > MAX_HIDDEN_CHANNELS:
        raise UsageError(f"--hint_hidden_channels {opts.hint_hidden_channels}: at most "
                         f"{MAX_HIDDEN_CHANNELS} (FeatInv: 512)")
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise UsageError(f"--out {opts.out!r} is a file, not a folder: choose another --out")
    _check_extractor(opts.extractor, opts.spatial)
    if opts.data != TOY_DATA and not Path(opts.data).is_dir():
        raise UsageError(f"--data {opts.data!r}: no such folder (or '{TOY_DATA}')")
    if opts.val_data is not None and not Path(opts.val_data).is_dir():
        raise UsageError(f"--val_data {opts.val_data!r}: no such folder")
    if not Path(opts.base).exists() or not Path(opts.ckpt).exists():
        raise UsageError(f"--base {opts.base!r} and --ckpt {opts.ckpt!r} must exist")
    target = load_config(opts.base).model.get("target")
    if target != LATENT_DIFFUSION:
        raise UsageError(f"--base {opts.base}: a {LATENT_DIFFUSION} config is needed, "
                         f"not {target!r}")
    last = Path(opts.out) / LAST
    if opts.resume and not last.is_file():
        raise UsageError(f"--resume: {last} " + ("is not a file" if last.exists() else "does not exist"))
    if not opts.resume and last.exists():
        raise UsageError(f"{opts.out} already holds a training ({LAST}): add --resume to "
                         "continue it, or choose another --out")


def _check_extractor(spec: str, spatial: bool) -> None:
    """Spec, model and layer names (the toy's built, others on the meta device: nothing is read)."""
    try:
        if parse_spec(spec).library == "toy":
            build_extractor(spec, spatial=spatial)
            return
        check_spec(spec, spatial)
    except ExtractorSpecError as e:
        raise UsageError(f"--extractor: {e}") from None


def shared_file_list(opts: TrainOptions) -> list[Path]:
    """--data's image files, walked once: rank 0 walks the folder and writes the list to
    DIR/files.txt, the other ranks (started after it, or waiting for it) read that."""
    listing = Path(opts.out) / FILE_LIST
    if rank_zero_only.rank == 0:
        files = list_images(opts.data)
        listing.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(listing, "".join(f"{f}\n" for f in files))
        return files
    for _ in range(600):
        if listing.is_file():
            return [Path(line) for line in listing.read_text().splitlines()]
        time.sleep(1)
    raise UsageError(f"{listing}: rank 0 did not list --data within 10 minutes")


def image_files(opts: TrainOptions) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of an image folder: --val_data's first --val_images
    spread over its classes, or as many taken from --data the same way."""
    files = shared_file_list(opts)
    if opts.val_data is None:
        held_out = spread_over_classes(files, opts.val_images)
        files = sorted(set(files) - set(held_out))
    else:
        held_out = spread_over_classes(list_images(opts.val_data), opts.val_images)
    if len(files) < opts.batch_size or len(held_out) < opts.val_images:
        raise UsageError(f"--data {opts.data}: {len(files)} training and {len(held_out)} held-out "
                         f"images, fewer than --batch_size {opts.batch_size} and --val_images "
                         f"{opts.val_images}")
    return files, held_out


def spread_over_classes(files: list[Path], n: int) -> list[Path]:
    """`n` of `files`, one per class (folder) round-robin over the classes, which are taken
    evenly spaced over their sorted order: a fixed, class-stratified choice."""
    by_class: dict[Path, list[Path]] = {}
    for f in sorted(files):
        by_class.setdefault(f.parent, []).append(f)
    classes = sorted(by_class)
    spaced = sorted(classes, key=lambda c: (classes.index(c) * n) % len(classes))
    picked = []
    for depth in range(max((len(v) for v in by_class.values()), default=0)):
        picked += [by_class[c][depth] for c in spaced if depth < len(by_class[c])]
    return picked[:n]


def _datasets(opts: TrainOptions, resolution: int, preprocessing: Preprocessing, files):
    if opts.data == TOY_DATA:
        return (ToyWorldPairs(opts.toy_images, TOY_TRAIN_SEED, resolution, preprocessing),
                ToyWorldPairs(opts.val_images, TOY_VAL_SEED, resolution, preprocessing))
    train, held_out = files
    return (ImageFolderPairs(train, resolution, preprocessing, augment=True),
            ImageFolderPairs(held_out, resolution, preprocessing, augment=False))


def _loaders(opts: TrainOptions, train, val):
    from torch.utils.data import DataLoader

    workers = opts.workers if opts.workers >= 0 else default_workers(opts.devices)
    common = {"num_workers": workers, "persistent_workers": workers > 0,
              "pin_memory": on_gpu(opts), "collate_fn": skip_unreadable}
    return (DataLoader(train, batch_size=opts.batch_size, shuffle=True, drop_last=True, **common),
            DataLoader(val, batch_size=min(opts.batch_size, opts.val_images), **common))


def default_workers(devices: int) -> int:
    """Loader processes per device: the machine's cores shared by the devices, at most 8."""
    return min(8, max(1, (os.cpu_count() or 1) // devices))


def on_gpu(opts: TrainOptions) -> bool:
    return opts.accelerator != "cpu" and torch.cuda.is_available()


def precision(opts: TrainOptions) -> str:
    """--precision, `auto` resolved; on CUDA, float32 matmuls may use TF32 (Ampere and later)."""
    if on_gpu(opts):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return "bf16-mixed" if opts.precision == "auto" else opts.precision
    return "32" if opts.precision == "auto" else opts.precision


class ExportDecoder(pl.Callback):
    """Writes the decoder file (the exported weights, see FeatInvTraining.decoder_state_dict)
    every `every` steps, from rank 0, replacing the previous one only once it is complete."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every

    def on_train_batch_end(self, trainer, module, *args) -> None:
        step = trainer.global_step
        if step % self.every == 0 and step != getattr(self, "_done", None):
            self._done = step
            self.export(trainer, module)

    def export(self, trainer, module) -> None:
        if trainer.is_global_zero:   # save_decoder writes atomically
            save_decoder(module.model, module.record, self.path, weights=module.decoder_state_dict())


def _loggers(out: str) -> list:
    """CSV always; TensorBoard too when it is installed (`pip install .[tensorboard]`)."""
    loggers = [CSVLogger(out, name="log")]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(out, name="tensorboard"))
    return loggers


def _trainer(opts: TrainOptions, export: ExportDecoder):
    return pl.Trainer(
        accelerator=opts.accelerator, devices=opts.devices, strategy=opts.strategy,
        precision=precision(opts), max_epochs=opts.epochs, max_steps=opts.max_steps,
        accumulate_grad_batches=opts.accumulate, gradient_clip_val=opts.grad_clip,
        default_root_dir=opts.out, logger=_loggers(opts.out), plugins=[SafeCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=opts.out, save_last=True, save_top_k=0,
                                   every_n_train_steps=opts.checkpoint_every),
                   LearningRateMonitor(logging_interval="step"), export,
                   SaveOnSigterm(Path(opts.out) / LAST)],
        val_check_interval=opts.val_every * opts.accumulate, check_val_every_n_epoch=None,
        log_every_n_steps=opts.log_every, num_sanity_val_steps=0,
        enable_progress_bar=opts.progress, enable_model_summary=False)


class _NoAdvertisement(logging.Filter):
    """Drops Lightning's tip to install its cloud logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


NO_ADVERTISEMENT = _NoAdvertisement()


def enable_gradient_checkpointing(model) -> None:
    """Recompute the UNet's and the ControlNet's blocks in the backward pass (less memory)."""
    for module in model.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = True


def project_relative(path: str) -> str:
    """A file of this project as its path in the project (the record travels with the decoder
    to other machines); any other path as given."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def _record(opts: TrainOptions, extractor, base_config) -> DecoderRecord:
    parsed = parse_spec(opts.extractor)
    conditioned = base_config.model.params.get("conditioning_key") is not None
    return DecoderRecord(
        extractor=str(parsed).partition("@")[0], layer=parsed.layer, spatial=opts.spatial,
        hint_shape=hint_shape(extractor), base_config=project_relative(opts.base),
        hint_hidden_channels=opts.hint_hidden_channels,
        prompt=FEATINV_PROMPT if conditioned else None, extractor_weights=opts.extractor_weights,
        sd_locked=opts.sd_locked)


def run(opts: TrainOptions, train_set=None):
    """Train (or continue) the decoder of `opts`; → (the FeatInvTraining module, a summary).
    `train_set`: prepared training pairs (e.g. data.CachedPairs) instead of --data's."""
    check_options(opts)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(NO_ADVERTISEMENT)
    files = None if opts.data == TOY_DATA else image_files(opts)
    start = time.perf_counter()
    pl.seed_everything(opts.seed, workers=True, verbose=False)
    base_config = load_config(opts.base)
    extractor = build_extractor(opts.extractor, weights=opts.extractor_weights,
                                spatial=opts.spatial)
    record = _record(opts, extractor, base_config)
    model = new_decoder(record, opts.ckpt, opts.base)
    if opts.grad_checkpoint:
        enable_gradient_checkpointing(model)
    module = FeatInvTraining(model, extractor, record, lr=opts.lr, lr_schedule=opts.lr_schedule,
                             timesteps=opts.timesteps, ema_decay=opts.ema_decay,
                             warmup_steps=opts.warmup_steps, seed=opts.seed,
                             val_steps=opts.val_steps)
    resolution = model.image_size * model.latent_downsample_factor
    train, val = _datasets(opts, resolution, extractor.preprocessing, files)
    train_loader, val_loader = _loaders(opts, train_set or train, val)
    if opts.benchmark_loader:
        return module, benchmark_loader(train_loader, opts.benchmark_loader)
    out = Path(opts.out)
    export = ExportDecoder(out / DECODER, opts.export_every)
    trainer = _trainer(opts, export)
    with warnings.catch_warnings():
        # the frozen base model and extractor are in eval mode on purpose
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        # a deprecation inside Lightning 2.6 itself, nothing a user of this command can change
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        # Lightning's checkpoints hold plain data only: read them with weights_only=True
        try:
            trainer.fit(module, train_loader, val_loader, weights_only=True,
                        ckpt_path=out / LAST if opts.resume else None)
        except SIGTERMException:
            raise TrainingStopped(f"stopped by SIGTERM after step {trainer.global_step}; saved "
                                  f"{out / LAST}: continue with --resume") from None
    if trainer.global_step % opts.checkpoint_every:   # Lightning's last save was earlier
        trainer.save_checkpoint(out / LAST, weights_only=False)
    export.export(trainer, module)
    summary = {"steps": trainer.global_step, "seconds": round(time.perf_counter() - start, 1),
               **{k: float(v) for k, v in trainer.callback_metrics.items()}}
    if trainer.is_global_zero:   # the one process that writes files (and the CSV log)
        summary["train/loss_recent"] = recent_mean(logged(out, "train/loss"))
        atomic_write_text(out / "decoder.json", json.dumps(
            {"record": json.loads(record.to_json()), "options": asdict(opts), "summary": summary},
            indent=1))
    return module, summary


def benchmark_loader(loader, batches: int) -> dict:
    """Images/s of `loader` over `batches` batches (after the first, which starts workers)."""
    iterator = iter(loader)
    next(iterator)
    start, images, skipped = time.perf_counter(), 0, 0
    for _, batch in zip(range(batches), iterator):
        images += len(batch["image"])
        skipped += int(batch["skipped"])
    seconds = time.perf_counter() - start
    return {"loader_images_per_s": round(images / seconds, 1), "images": images,
            "skipped": skipped, "workers": loader.num_workers}


def logged(out: str | Path, key: str) -> list[float]:
    """The values of `key` in the run's CSV logs, in order (every version, i.e. every start)."""
    versions = sorted(Path(out, "log").glob("version_*/metrics.csv"),
                      key=lambda p: int(p.parent.name.removeprefix("version_")))
    rows = [row for path in versions for row in csv.DictReader(path.read_text().splitlines())]
    return [float(row[key]) for row in rows if row.get(key)]


def recent_mean(values: list[float], n: int = 10) -> float | None:
    return sum(values[-n:]) / len(values[-n:]) if values else None


def main(argv=None) -> int:
    opts = parse_args(argv)
    try:
        _, summary = run(opts)
    except TrainingStopped as e:
        print(e, file=sys.stderr)
        return 143
    except (UsageError, InputError, CheckpointError, ExtractorSpecError,
            ResumeMismatchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        print(f"error: cannot write {e.filename or opts.out} ({e.strerror}): free some space, then "
              "continue with --resume", file=sys.stderr)
        return 2
    if rank_zero_only.rank == 0:   # one summary per run, not one per process
        print(json.dumps(summary))
    return 0
