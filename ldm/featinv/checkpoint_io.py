"""Lightning's `last.ckpt` of a FeatInv training, read and written the project's way: read by
the weights-only loader of ldm/checkpoint.py (a hostile or damaged file is one error line),
its layout checked before Lightning reads it; written atomically (ldm/files.py). A full disk
while writing it is a warning: the previous `last.ckpt` is intact and training goes on. SIGTERM
saves it before the training stops."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from pytorch_lightning import Callback
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.checkpoint import CheckpointError, load_pickled
from ldm.featinv.decoder import DecoderRecord
from ldm.files import DISK_FULL, atomic_write
from ldm.models.diffusion.controlled_ddpm import trained_prefixes

EMA = "ema."   # the trained tensors' exponential moving average's keys
# What Lightning reads back from a checkpoint, and their types.
LAYOUT = {"state_dict": dict, "optimizer_states": list, "loops": dict, "epoch": int,
          "global_step": int, "featinv_record": str}


def saved_prefixes(sd_locked: bool) -> tuple[str, ...]:
    """The keys of what last.ckpt keeps, in the training module's state_dict (the ControlLDM is
    its `model`): the trained tensors and their EMA."""
    return (*(f"model.{prefix}" for prefix in trained_prefixes(sd_locked)), EMA)


def check_training_checkpoint(path, checkpoint) -> None:
    """CheckpointError unless `checkpoint` looks like a FeatInv training's last.ckpt: Lightning's
    entries of the right types, a valid record, the tensors of what its training trained only
    (the ControlNet; unlocked, the UNet's decoder half too) and their EMA."""
    def damaged(problem: str):
        return CheckpointError(f"{path} is not a FeatInv training checkpoint ({problem}): train "
                               "into another --out, or remove the file to start again")
    if not isinstance(checkpoint, dict):
        raise damaged(f"it holds a {type(checkpoint).__name__}")
    for key, kind in LAYOUT.items():
        if type(checkpoint.get(key)) is not kind:
            raise damaged(f"no {kind.__name__} {key!r}")
    sd_locked = DecoderRecord.from_json(checkpoint["featinv_record"]).sd_locked
    trained = "a ControlNet tensor" + ("" if sd_locked else " or one of the UNet's decoder half")
    prefixes = saved_prefixes(sd_locked)
    for key, value in checkpoint["state_dict"].items():
        if not (isinstance(key, str) and key.startswith(prefixes)
                and isinstance(value, torch.Tensor)):
            raise damaged(f"its state_dict holds {str(key)[:100]!r}, not {trained}")


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's CheckpointIO with the project's reading and writing (see the module)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            print(f"warning: could not write {path} ({err.strerror}); the previous {path.name} is "
                  "intact; training goes on", file=sys.stderr)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        checkpoint = load_pickled(Path(path))   # always weights-only
        check_training_checkpoint(path, checkpoint)
        return checkpoint


class SaveOnSigterm(Callback):
    """SIGTERM (a cluster scheduler's stop): Lightning stops at the next step boundary with
    SIGTERMException; this saves `path` (last.ckpt) first, so that --resume continues there."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
