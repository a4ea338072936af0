"""Tiny stand-ins shared by the tests: a tiny SD-v1-shaped model with a short schedule, a tiny
feature extractor, and the one helper that runs the command line on them (in this process, or
as a subprocess for tests that send signals or use torchrun)."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.extractors.base import FeatureExtractor
from ldm.extractors.preprocessing import Preprocessing
from ldm.models.tiny_sd import tiny_config as sd_tiny_config
from ldm.models.tiny_sd import tiny_model as sd_tiny_model

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TARGET = REPO / "data" / "examples" / "chelsea.jpg"
# A script of the tiny extractor, as a user would write one (scripts/*_guided.py).
RUNNER = f"""import sys
sys.path.insert(0, {str(TESTS)!r})
from tiny_models import TinyExtractor
from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(TinyExtractor))
"""


def tiny_config(timesteps: int = 20):
    return sd_tiny_config(timesteps)


def tiny_model(timesteps: int = 20, seed: int = 0):
    """The tiny LDM of ldm/models/tiny_sd.py with a short schedule (20 timesteps)."""
    return sd_tiny_model(timesteps, seed)


class TinyExtractor(FeatureExtractor):
    """Conv → ReLU → pool: an 8-d feature of a 16x16 image."""

    name = "tiny"
    preprocessing = Preprocessing(input_size=16)

    def __init__(self, weights: str | None = None, device="cpu", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        if weights:
            self.net.load_state_dict(torch.load(weights, weights_only=True))
        self.freeze().to(device)

    def encode(self, x):
        return self.net(x)


def write_tiny_sd(folder: Path, timesteps: int = 20) -> Path:
    """tiny.yaml, tiny.ckpt (a Lightning-style {"state_dict": ...}) and the runner script
    tiny_guided.py in `folder`; → folder."""
    folder = Path(folder)
    OmegaConf.save(tiny_config(timesteps), folder / "tiny.yaml")
    torch.save({"state_dict": tiny_model(timesteps).state_dict()}, folder / "tiny.ckpt")
    (folder / "tiny_guided.py").write_text(RUNNER)
    return folder


def tiny_args(sd_files: Path, folder: Path, *extra, prompt=(TARGET,)) -> list[str]:
    """The flags every tiny run shares: the tiny model, 16x16 images, the CPU, no progress bar."""
    return ["--config", str(sd_files / "tiny.yaml"), "--ckpt", str(sd_files / "tiny.ckpt"),
            "--H", "16", "--W", "16", "--device", "cpu", "--no_progress",
            "--prompt", *map(str, prompt), "--optim_folder", str(folder), *map(str, extra)]


def run_cli(extractor, argv, capsys, **main_kwargs) -> tuple[int, str, str]:
    """`ldm.cli.main(extractor, argv=argv)` in this process; → (exit code, stdout, stderr)."""
    from ldm.cli import main
    code = main(extractor, argv=[str(a) for a in argv], **main_kwargs)
    out, err = capsys.readouterr()
    return code, out, err


def start_runner(sd_files: Path, args: list[str], runner: list[str] | None = None,
                 **popen_kwargs) -> subprocess.Popen:
    """The runner script (or `runner`, e.g. torchrun) as a subprocess, one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [*(runner or [sys.executable]), str(sd_files / "tiny_guided.py"), *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen_kwargs)


def write_tiny_featinv(folder: Path) -> Path:
    """`write_tiny_sd` plus `decoder.safetensors`: a FeatInv decoder of TinyExtractor's pooled
    feature on it, as training starts it (ControlNet copied from the UNet, zero convolutions)."""
    from ldm.featinv import FEATINV_PROMPT, DecoderRecord, new_decoder, save_decoder

    folder = write_tiny_sd(folder)
    record = DecoderRecord("tiny", None, False, (8, 1, 1), str(folder / "tiny.yaml"), 16, FEATINV_PROMPT)
    save_decoder(new_decoder(record, folder / "tiny.ckpt", folder / "tiny.yaml"), record,
                 folder / "decoder.safetensors")
    return folder


def stopped_run(extractor, argv, capsys, monkeypatch, after: int = 3) -> tuple[int, str, str]:
    """`run_cli`, stopped as SIGINT stops it once `after` iterations are done (the stop flag is
    polled at each iteration boundary)."""
    import signal

    from ldm.cli.signals import StopOnSignals
    polls = {"n": 0}

    def stop(self):
        polls["n"] += 1
        if polls["n"] > after:
            self.signum = signal.SIGINT
        return self.signum is not None

    with monkeypatch.context() as m:
        m.setattr(StopOnSignals, "__call__", stop)
        return run_cli(extractor, argv, capsys)
