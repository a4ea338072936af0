"""FeatInv training against damaged or hostile inputs (issue 22): every bad last.ckpt, bad flag or
full disk is one `error:` line (exit 2), a bad image in --data is skipped and counted, SIGTERM
stops a training with last.ckpt saved and a FeatInv decoding at the next step; nothing the
training writes is torn (atomic writes)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.cli import main as decode_main
from ldm.cli.signals import StopOnSignals
from ldm.featinv.data import ImageFolderPairs, skip_unreadable
from ldm.featinv.train_command import main
from ldm.extractors.preprocessing import Preprocessing
from ldm.run_folder import names
from ldm.toy import world
from tiny_models import TinyExtractor, tiny_args, write_tiny_featinv, write_tiny_sd

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
       "PYTHONPATH": str(REPO)}


def flags(root: Path, out: Path, *extra) -> list[str]:
    return ["--extractor", "toy:all@body.17", "--spatial", "--data", str(root / "images"),
            "--base", str(root / "tiny.yaml"), "--ckpt", str(root / "tiny.ckpt"), "--out", str(out),
            "--batch_size", "2", "--val_images", "2", "--val_every", "1000", "--checkpoint_every", "2",
            "--hint_hidden_channels", "8", "--accelerator", "cpu", "--no_progress", *map(str, extra)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_training")
    write_tiny_sd(folder)
    (folder / "images").mkdir()
    for k, image in enumerate(world.make_dataset(6, seed=5)[0]):
        Image.fromarray(world.to_uint8(image)).save(folder / "images" / f"img_{k}.png")
    return folder


@pytest.fixture(scope="module")
def last_ckpt(root):
    """A real last.ckpt of two steps."""
    out = root / "trained"
    done = subprocess.run([sys.executable, "scripts/train_featinv.py", *flags(root, out, "--max_steps", 2)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "last.ckpt", weights_only=True)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def control_key(checkpoint) -> str:
    return next(k for k in checkpoint["state_dict"] if "input_hint_block" in k and k.endswith(".weight"))


def with_nan(c):
    c["state_dict"][control_key(c)] = c["state_dict"][control_key(c)] * float("nan")


def sliced(c):
    c["state_dict"][control_key(c)] = c["state_dict"][control_key(c)][:1].clone()


LAST_CKPTS = [   # (how last.ckpt is made from a real one, words of the error)
    (lambda p, c: torch.save({**c, "x": Payload()}, p), "refused by the weights-only loader"),
    (lambda p, c: (torch.save(c, p), p.write_bytes(p.read_bytes()[:5000])), "truncated or corrupt"),
    (lambda p, c: p.write_bytes(b""), "empty file"),
    (lambda p, c: torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), p), "TorchScript archive"),
    (lambda p, c: (with_nan(c), torch.save(c, p)), "holds NaN or inf values"),
    (lambda p, c: (sliced(c), torch.save(c, p)), "wrong-shape"),
    (lambda p, c: torch.save({**c, "featinv_record": "{not json"}, p), "not a featinv-controlnet/1 record"),
    (lambda p, c: torch.save({**c, "featinv_record": json.dumps({**json.loads(c["featinv_record"]), "x": 1})}, p),
     "unknown fields ['x']"),
    (lambda p, c: torch.save([1, 2], p), "not a FeatInv training checkpoint (it holds a list)"),
    (lambda p, c: torch.save({**c, "state_dict": {"model.first_stage_model.w": torch.ones(1)}}, p),
     "not a ControlNet tensor"),
    (lambda p, c: torch.save({**c, "state_dict": {**c["state_dict"],   # a locked training's
                                                  "model.model.diffusion_model.out.2.bias": torch.ones(4)}}, p),
     "not a ControlNet tensor"),
    (lambda p, c: p.mkdir(), "last.ckpt is not a file"),
]


@pytest.mark.parametrize("make, message", LAST_CKPTS, ids=[m for _, m in LAST_CKPTS])
def test_bad_resume_checkpoints_are_one_error_line(root, last_ckpt, tmp_path, capsys, make, message):
    out = tmp_path / "out"
    out.mkdir()
    make(out / "last.ckpt", {**last_ckpt, "state_dict": dict(last_ckpt["state_dict"])})
    assert main(flags(root, out, "--resume", "--max_steps", 4)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err, err
    assert not (out / "decoder.safetensors").exists()


BAD_FLAGS = [
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number > 0"),
    (["--hint_hidden_channels", "1000000"], "--hint_hidden_channels 1000000: at most 4096"),
]


@pytest.mark.parametrize("extra, message", [*BAD_FLAGS, ("file", "is a file, not a folder")],
                         ids=[m for _, m in BAD_FLAGS] + ["--out a file"])
def test_bad_flags_are_one_error_line(root, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    if extra == "file":
        out.write_text("mine")
        extra = []
    assert main(flags(root, out, *extra)) == 2
    assert message in capsys.readouterr().err


def test_unreadable_training_images_are_skipped_and_counted(root, tmp_path, capsys):
    good = sorted((root / "images").iterdir())[:2]
    (tmp_path / "bomb.png").write_bytes(good[0].read_bytes()[:40])           # truncated
    (tmp_path / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    (tmp_path / "dir.png").mkdir()
    files = [tmp_path / "bomb.png", good[0], tmp_path / "eps.png", tmp_path / "dir.png", good[1]]
    data = ImageFolderPairs(files, 32, Preprocessing(input_size=32), augment=False)
    items = [data[k] for k in range(len(files))]
    assert [item is None for item in items] == [True, False, True, True, False]
    batch = skip_unreadable(items)                 # the loader's collate: left out and counted
    assert batch["image"].shape == (2, 3, 32, 32) and int(batch["skipped"]) == 3
    err = capsys.readouterr().err
    assert err.count("warning: skipping") == 3 and "eps.png" in err and "dir.png" in err


def test_a_full_disk_warns_for_last_ckpt_and_fails_cleanly_for_the_decoder(root, tmp_path, capsys, monkeypatch):
    import ldm.featinv.checkpoint_io as checkpoint_io
    import ldm.featinv.decoder as decoder

    def full(path, write):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_io, "atomic_write", full)
    monkeypatch.setattr(decoder, "atomic_write", full)
    out = tmp_path / "out"
    assert main(flags(root, out, "--max_steps", 2)) == 2
    err = capsys.readouterr().err
    assert "warning: could not write" in err and "training goes on" in err
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write {out / 'decoder.safetensors'} "
                                                   "(No space left on device)")
    assert not list(out.glob("*.safetensors")) and not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_sigterm_stops_a_training_with_last_ckpt_saved(root, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "scripts/train_featinv.py", *flags(root, out, "--max_steps", 10000)],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM after step" in err and "continue with --resume" in err
    steps = int(err.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert torch.load(out / "last.ckpt", weights_only=True)["global_step"] == steps
    assert not (out / "decoder.safetensors").exists()


# --- a FeatInv decoding stopped by SIGTERM ------------------------------------------------------

@pytest.fixture(scope="module")
def featinv_files(tmp_path_factory):
    return write_tiny_featinv(tmp_path_factory.mktemp("featinv_stop"))


def test_sigterm_stops_a_featinv_run_and_an_overwrite_keeps_the_old_results(featinv_files, tmp_path, capsys,
                                                                            monkeypatch):
    folder = tmp_path / "out"
    args = tiny_args(featinv_files, folder, "--decoder", "featinv", "--featinv_decoder",
                     featinv_files / "decoder.safetensors", "--featinv_steps", "10")
    assert decode_main(TinyExtractor, argv=args) == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != names.LOCK}
    polls = {"n": 0}

    def term_after_three(self):
        polls["n"] += 1
        if polls["n"] >= 3:
            self.signum = signal.SIGTERM
        return self.signum is not None

    monkeypatch.setattr(StopOnSignals, "__call__", term_after_three)
    capsys.readouterr()
    assert decode_main(TinyExtractor, argv=[*args, "--overwrite", "--seed", "3"]) == 143
    assert "stopped by SIGTERM after FeatInv DDIM step 3 of 10" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != names.LOCK}
    assert after == before


def test_a_numerical_fault_of_featinv_is_one_error_line(featinv_files, tmp_path, capsys):
    args = tiny_args(featinv_files, tmp_path / "out", "--decoder", "featinv", "--featinv_decoder",
                     featinv_files / "decoder.safetensors", "--featinv_steps", "3", "--featinv_guidance", "1e308")
    assert decode_main(TinyExtractor, argv=[str(a) for a in args]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: non-finite values (NaN or inf)") and "--featinv_guidance too large" in err, err
    assert not (tmp_path / "out" / "out_img.png").exists()
