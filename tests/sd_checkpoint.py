"""Checkpoints shaped like the real sd-v1-4.ckpt, for tests: a PyTorch Lightning 1.x checkpoint
whose "callbacks" are keyed by the ModelCheckpoint class, with numpy scalars in its state."""
import numpy as np
import torch


def lightning_checkpoint(state_dict: dict) -> dict:
    """The top level of sd-v1-4.ckpt around `state_dict` (real Lightning class, real numpy
    scalars: what `torch.serialization.get_unsafe_globals_in_checkpoint` reports for it)."""
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    return {"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
            "state_dict": state_dict,
            "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": np.float64(0.125),
                                            "best_model_path": "/logs/epoch=000006.ckpt",
                                            "current_score": None, "dirpath": "/logs/checkpoints"}}}


def write_sd_v1_ckpt(path, state_dict: dict) -> None:
    torch.save(lightning_checkpoint(state_dict), path)
