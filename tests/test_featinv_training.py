"""FeatInv training through PyTorch Lightning on the tiny SD-layout model and a few images: a run
with loader workers, an EMA, gradient accumulation and validation images, its resume, DDP; a run
with the UNet's decoder half unlocked (--sd_locked false).

Training runs in subprocesses, as from the command line (DDP launches its own processes)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import load_state_dict
from ldm.featinv import load_decoder, read_record
from ldm.featinv import train_command as train
from ldm.featinv.train_command import main
from ldm.toy import world
from tiny_models import write_tiny_sd

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_featinv.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
TRAIN_AND_INSPECT = """
import json, sys, torch
from ldm.checkpoint import load_state_dict
from ldm.featinv.train_command import parse_args, run
module, summary = run(parse_args(sys.argv[2:]))
base = load_state_dict(sys.argv[1])
state = {k: v.clone() for k, v in module.model.state_dict().items()}
control = module.model.control_model.state_dict()
unet = module.model.model.diffusion_model.state_dict()
exported = module.decoder_state_dict()
with module.exported_weights():   # what validation samples with
    swapped = all(torch.equal(module.model.state_dict()[k], v) for k, v in exported.items())
print(json.dumps({
    "trainable": sorted({n.removeprefix("model.").removeprefix("model.diffusion_model.").split(".")[0]
                         for n, p in module.named_parameters() if p.requires_grad}),
    "base_keys_unchanged": all(torch.equal(state[k], v) for k, v in base.items() if k in state),
    "base_keys_compared": sum(k in state for k in base),
    "unet_changed": sorted({k.split(".")[2] for k, v in base.items()
                            if k.startswith("model.diffusion_model.") and not torch.equal(state[k], v)}),
    "copied_blocks_changed": sum(not torch.equal(v, unet[k]) for k, v in control.items() if k in unet),
    "zero_convs_nonzero": sum(bool(v.any()) for k, v in control.items() if "zero_convs" in k),
    "exported_keys": sorted({k.split(".")[0] if k.startswith("control_model.") else k.split(".")[2]
                             for k in exported}),
    "exported_swapped_in": swapped,
    "restored": all(torch.equal(module.model.state_dict()[k], v) for k, v in state.items()),
}))
"""


def write_images(folder: Path, n: int) -> Path:
    """Toy-world images at a few sizes and aspect ratios (crops have work to do)."""
    folder.mkdir()
    images, _ = world.make_dataset(n, seed=99)
    for k, image in enumerate(images):
        size = (40 + 8 * (k % 3), 32 + 4 * (k % 2))
        Image.fromarray(world.to_uint8(image)).resize(size).save(folder / f"img_{k}.png")
    return folder


def flags(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--extractor", "toy:all@body.17", "--spatial", "--data", str(root / "images"),
            "--base", str(root / "tiny.yaml"), "--ckpt", str(root / "tiny.ckpt"),
            "--out", str(out), "--batch_size", "2", "--val_images", "2", "--val_every", "2",
            "--checkpoint_every", "2", "--log_every", "1", "--lr", "1e-3", "--lr_schedule", "cosine",
            "--hint_hidden_channels", "8", "--epochs", "100", "--accelerator", "cpu",
            "--no_progress", *extra]


def run_script(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=ENV, timeout=timeout,
                          capture_output=True, text=True)


def logged_steps(out: Path, version: int) -> list[int]:
    text = (out / "log" / f"version_{version}" / "metrics.csv").read_text()
    return [int(r["step"]) for r in csv.DictReader(text.splitlines()) if r.get("train/loss")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("featinv_training")
    write_tiny_sd(folder)
    write_images(folder / "images", 6)
    return folder


RECIPE = ("--workers", "2", "--accumulate", "2", "--ema_decay", "0.5", "--export_every", "2")


@pytest.fixture(scope="module")
def trained(root):
    """Three training steps (two batches each) in a subprocess, two loader workers, an EMA;
    → (run folder, what the trained module showed)."""
    return train_and_inspect(root, root / "run", "--max_steps", "3", *RECIPE)


def train_and_inspect(root, out, *options):
    """Train into `out` in a subprocess; → (out, what the trained module showed)."""
    done = subprocess.run([sys.executable, "-c", TRAIN_AND_INSPECT, str(root / "tiny.ckpt"),
                           *flags(root, out, *options)],
                          cwd=REPO, env=ENV, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1])


def test_only_the_controlnet_trains(trained):
    _, inspected = trained
    assert inspected["trainable"] == ["control_model"] and inspected["unet_changed"] == []
    assert inspected["base_keys_unchanged"] and inspected["base_keys_compared"] > 200
    assert inspected["copied_blocks_changed"] > 0 and inspected["zero_convs_nonzero"] > 0
    assert inspected["exported_keys"] == ["control_model"]
    assert inspected["exported_swapped_in"] and inspected["restored"]


def test_outputs_of_a_run(trained, root):
    out, _ = trained
    summary = json.loads((out / "decoder.json").read_text())["summary"]
    assert summary["steps"] == 3 and np.isfinite(summary["train/loss_recent"])
    assert -1 <= summary["val/cosine"] <= 1
    assert logged_steps(out, 0) == [0, 1, 2]
    samples = Image.open(out / "val" / "step_0000002.png")   # validated at step 2: 2 pairs
    assert samples.width > 2 * samples.height
    listed = (out / "files.txt").read_text().splitlines()
    assert len(listed) == 6 and Path(listed[0]).is_file()
    record = read_record(out / "decoder.safetensors")
    assert (record.extractor, record.layer, record.spatial, record.hint_shape) == \
        ("toy:all", "body.17", True, (128, 2, 2))
    assert record.prompt == "a high-quality, detailed, and professional image"


def test_lightning_checkpoint_is_plain_data_with_the_controlnet_only(trained):
    out, _ = trained
    checkpoint = torch.load(out / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["state_dict"] and all(k.startswith(("model.control_model.", "ema."))
                                            for k in checkpoint["state_dict"])
    assert checkpoint["optimizer_states"][0]["state"]
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 3     # the cosine decay's step


def test_saved_decoder_loads_strictly_into_a_fresh_model(trained, root):
    out, _ = trained
    model, record = load_decoder(out / "decoder.safetensors", root / "tiny.ckpt", root / "tiny.yaml")
    saved = load_state_dict(out / "decoder.safetensors")
    assert saved.keys() == {"control_model." + k for k in model.control_model.state_dict()}
    checkpoint = torch.load(out / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in saved.items():   # the exported weights are the EMA's
        assert torch.equal(value, checkpoint["ema.module." + key.removeprefix("control_model.")])
    assert any(not torch.equal(v, checkpoint["model." + k]) for k, v in saved.items())
    assert record.hint_hidden_channels == 8


@pytest.mark.slow
def test_resume_continues_the_step_count(trained, root):
    out, _ = trained
    done = run_script(flags(root, out, "--max_steps", "5", "--resume"))
    assert done.returncode == 2 and "resume with the same --ema_decay" in done.stderr
    done = run_script(flags(root, out, "--max_steps", "5", "--resume", *RECIPE))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "decoder.json").read_text())["summary"]["steps"] == 5
    assert logged_steps(out, 2) == [3, 4]   # version 1: the refused start
    assert torch.load(out / "last.ckpt", weights_only=True)["global_step"] == 5


def test_resume_of_another_decoder_is_refused(trained, root):
    out, _ = trained
    done = run_script(changed(flags(root, out, "--max_steps", "9", "--resume"),
                              {"--hint_hidden_channels": "16"}))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "trained for another decoder" in done.stderr


UNLOCKED = ("--sd_locked", "false", "--grad_checkpoint", "--ema_decay", "0.5", "--export_every", "2",
            "--workers", "0")


@pytest.fixture(scope="module")
def unlocked(root):
    """Two steps with the UNet's decoder half trained too (and gradient checkpointing, an EMA);
    → (run folder, what the trained module showed)."""
    return train_and_inspect(root, root / "unlocked", "--max_steps", "2", *UNLOCKED)


def test_unlocked_the_unets_decoder_half_trains_too(unlocked):
    _, inspected = unlocked
    assert inspected["trainable"] == ["control_model", "out", "output_blocks"]
    assert inspected["unet_changed"] == ["out", "output_blocks"]   # not input_blocks, middle_block
    assert inspected["exported_keys"] == ["control_model", "out", "output_blocks"]
    assert inspected["exported_swapped_in"] and inspected["restored"]


def test_unlocked_decoder_file_holds_the_trained_unet_half(unlocked, root):
    out, _ = unlocked
    checkpoint = torch.load(out / "last.ckpt", weights_only=True)["state_dict"]
    unet_keys = {k.split(".")[3] for k in checkpoint if k.startswith("model.model.")}
    assert unet_keys == {"output_blocks", "out"}   # besides the ControlNet's and the EMA's
    model, record = load_decoder(out / "decoder.safetensors", root / "tiny.ckpt", root / "tiny.yaml")
    assert record.sd_locked is False
    unet = model.model.diffusion_model
    for name in ("output_blocks", "out"):   # the EMA's, which differ from the base's
        for key, value in getattr(unet, name).state_dict().items():
            assert torch.equal(value, checkpoint[f"ema.module.model.diffusion_model.{name}.{key}"])
    base = load_state_dict(root / "tiny.ckpt")
    loaded = model.state_dict()
    changed = {k.split(".")[2] for k, v in base.items()
               if k.startswith("model.diffusion_model.") and not torch.equal(loaded[k], v)}
    assert changed == {"output_blocks", "out"}


@pytest.mark.slow
def test_unlocked_resume_needs_the_same_sd_locked(unlocked, root):
    out, _ = unlocked
    locked = changed(UNLOCKED, {"--sd_locked": "true"})
    done = run_script(flags(root, out, "--max_steps", "3", "--resume", *locked))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "trained with --sd_locked false: resume with the same --sd_locked" in done.stderr
    done = run_script(flags(root, out, "--max_steps", "3", "--resume", *UNLOCKED))
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(out / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_locked_run_refuses_to_resume_unlocked(trained, root):
    out, _ = trained
    done = run_script(flags(root, out, "--max_steps", "9", "--resume", *RECIPE, "--sd_locked", "false"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "trained with --sd_locked true: resume with the same --sd_locked" in done.stderr


def test_sd_locked_is_true_or_false(root, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(flags(root, tmp_path / "out", "--sd_locked", "maybe"))
    assert stopped.value.code == 2
    assert "argument --sd_locked: true or false, not 'maybe'" in capsys.readouterr().err


RECORD_DRAWS = """
import json, os, sys
import torch
from ldm.models.diffusion.controlled_ddpm import ControlLDM
from ldm.featinv.train_command import main

def recording_q_sample(self, z0, t, noise, _q_sample=ControlLDM.q_sample):
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(os.path.join(os.environ["DRAWS"], f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"t": t.tolist(), "noise": noise.flatten()[:8].tolist()}) + "\\n")
    return _q_sample(self, z0, t, noise)

ControlLDM.q_sample = recording_q_sample   # only training draws noisy latents (validation samples)
sys.exit(main())
"""


def ddp_draws(root: Path, name: str) -> dict[int, list]:
    """Train 2 steps with 2 CPU processes (DDP over gloo); → each rank's timesteps and noise."""
    script, draws = root / "record_draws.py", root / f"{name}_draws"
    script.write_text(RECORD_DRAWS)
    draws.mkdir()
    done = subprocess.run(
        [sys.executable, str(script), *flags(root, root / name, "--max_steps", "2", "--devices",
                                             "2", "--strategy", "ddp", "--workers", "0")],
        cwd=REPO, env={**ENV, "DRAWS": str(draws), "PYTHONPATH": str(REPO)}, timeout=300,
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed_backend=gloo" in done.stderr + done.stdout
    assert done.stdout.count('"steps": 2') == 1       # one summary, from rank 0
    assert "litlogger" not in done.stderr + done.stdout
    load_decoder(root / name / "decoder.safetensors", root / "tiny.ckpt", root / "tiny.yaml")
    return {rank: [json.loads(line) for line in (draws / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}


@pytest.mark.slow
def test_ddp_ranks_draw_their_own_numbers_reproducibly(root):
    first = ddp_draws(root, "ddp")
    assert len(first[0]) == len(first[1]) == 2
    for step in range(2):
        assert first[0][step]["t"] != first[1][step]["t"]
        assert first[0][step]["noise"] != first[1][step]["noise"]
    assert ddp_draws(root, "ddp_again") == first


BAD_FLAGS = [   # changes to good flags (None: add the bare flag) → the error's words
    ({"--extractor": "toy:all@body.99"}, "has no layer 'body.99'"),
    ({"--extractor": "toy:all"}, "spatial=True needs a layer"),
    ({"--data": "/no/such/folder"}, "no such folder"),
    ({"--val_images": "5"}, "1 training and 5 held-out images, fewer than --batch_size 2"),
    ({"--ckpt": "/no/such.ckpt"}, "must exist"),
    ({"--batch_size": "0"}, "--batch_size must be at least 1"),
    ({"--resume": None}, "does not exist"),
]


def changed(args: list[str], changes: dict) -> list[str]:
    args = list(args)
    for flag, value in changes.items():
        if value is None:
            args.append(flag)
        else:
            args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize("changes, message", BAD_FLAGS, ids=[m for _, m in BAD_FLAGS])
def test_bad_flags_are_clear_errors_before_anything_loads(root, tmp_path, capsys, monkeypatch,
                                                         changes, message):
    def never(*args):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(train, "new_decoder", never)
    assert main(changed(flags(root, tmp_path / "out"), changes)) == 2
    assert message in capsys.readouterr().err


def test_a_finished_run_is_not_overwritten(trained, root, capsys):
    out, _ = trained
    assert main(flags(root, out, "--max_steps", "3")) == 2
    assert "already holds a training (last.ckpt): add --resume" in capsys.readouterr().err


def test_loader_benchmark_prints_images_per_second(root, tmp_path, capsys):
    assert main(flags(root, tmp_path / "bench", "--benchmark_loader", "1", "--workers", "0")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 2 and result["loader_images_per_s"] > 0 and result["skipped"] == 0
    assert not (tmp_path / "bench" / "last.ckpt").exists()


OWN_NET = '''
import torch
from torch import nn

from ldm.extractors import FeatureExtractor
from ldm.extractors.preprocessing import Preprocessing


class MyNet(FeatureExtractor):
    preprocessing = Preprocessing(input_size=32)

    def __init__(self, weights=None, device="cpu"):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.freeze().to(device)

    def embed(self, x):
        return self.model(x)
'''


def test_a_class_of_the_users_own_trains_a_decoder(root):
    """--extractor file.py:Class@layer: a model of the user's own, as a registry name would."""
    (root / "mynet.py").write_text(OWN_NET)
    out = root / "own"
    pooled = lambda out, layer: [a for a in flags(root, out, "--extractor", f"{root / 'mynet.py'}:MyNet@{layer}",  # noqa: E731
                                                  "--max_steps", "1") if a != "--spatial"]
    done = run_script(pooled(out, 2))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "decoder.json").read_text())["record"]
    assert (record["extractor"], record["layer"], record["hint_shape"]) == ("local:MyNet", "2", [8, 1, 1])
    bad = run_script(pooled(root / "own_bad", 9))
    assert bad.returncode == 2 and "valid names near '9'" in bad.stderr and "Traceback" not in bad.stderr
