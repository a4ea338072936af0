"""Runs that survive: a run killed at a random point (SIGKILL) or stopped by SIGINT/SIGTERM and
resumed gives exactly the files of an uninterrupted run; resuming with other settings, target
or checkpoint is refused naming the difference; finished and interrupted runs are not
clobbered; a NaN stops the run keeping the best image and the state.

The interruption tests run real subprocesses (`python <script> ...`) of the shared command line
with tiny stand-in models: a tiny SD-v1-shaped model (20 timesteps) and `TinyExtractor`."""
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ldm.cli.command as cli_run
from ldm.files import atomic_write_bytes
from ldm.run_folder import names, peek_run
from ldm.scorelog import read_scores
from tiny_models import REPO, TinyExtractor, run_cli, start_runner, tiny_args, tiny_config, tiny_model, write_tiny_sd

STATE_FILE = names.STATE
T = 20
TARGET = REPO / "data/examples/chelsea.jpg"
# 4 timesteps x 10 self-recurrences + 16 x 3 = 88 iterations, z_prev selection, intermediates.
SUBPROCESS_FLAGS = ["--optim_forward_guidance", "--optim_forward_guidance_wt", "4",
                    "--optim_grad_clip_threshold", "3", "--optim_num_steps", "10", "3",
                    "--optim_early_emp_end", "16", "--optim_select_prev", "--optim_print",
                    "--save_every", "1"]
TOTAL = 4 * 10 + 16 * 3
@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd"), T)


def base_args(sd_files, folder, *extra) -> list[str]:
    return tiny_args(sd_files, folder, *extra, prompt=(TARGET,))


def start(sd_files, args) -> subprocess.Popen:
    return start_runner(sd_files, args)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def iterations_saved(folder: Path) -> int:
    """Iterations done in the folder's resume state (-1 while there is none). The state file
    is replaced atomically, so reading it while the run writes it is safe."""
    try:
        return peek_run(folder / STATE_FILE)["sampler"]["iterations"]
    except FileNotFoundError:
        return -1


def wait_for_state(proc, folder: Path, iterations: int, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = iterations_saved(folder)
        if done >= iterations:
            return done
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before iteration {iterations}:"
                                 f" {proc.stderr.read()}")
        time.sleep(0.005)
    raise AssertionError(f"no resume state with {iterations} iterations after {timeout} s")


def assert_same_run(folder: Path, reference: Path):
    """Same files; PNGs byte for byte; log.txt except the Elapsed line; metrics.json except the
    wall time and the resume history (the folder's own name is normalised away)."""
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(p.name for p in reference.iterdir())
    assert len([f for f in files if f.startswith("out_img_best_t_")]) == 1
    for name in files:
        if name.endswith(".png"):
            assert (folder / name).read_bytes() == (reference / name).read_bytes(), name

    def log(path: Path) -> list[str]:
        lines = path.read_text().replace(str(path.parent), "FOLDER").splitlines()
        return [line for line in lines if not line.startswith("Elapsed time = ")]

    assert log(folder / "log.txt") == log(reference / "log.txt")

    def metrics(path: Path) -> dict:
        m = json.loads(path.read_text().replace(str(path.parent), "FOLDER"))
        assert m["finished"] is True and m["iterations"] == TOTAL
        for key in ("wall_time_s", "resumes"):
            m.pop(key)
        return m

    assert metrics(folder / "metrics.json") == metrics(reference / "metrics.json")


@pytest.fixture(scope="module")
def reference(sd_files, tmp_path_factory):
    """An uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference") / "out"
    code, _, err = finish(start(sd_files, base_args(sd_files, folder, *SUBPROCESS_FLAGS)))
    assert code == 0, err
    assert not (folder / STATE_FILE).exists()          # a finished run leaves no state behind
    return folder


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_gives_identical_outputs(sd_files, reference, tmp_path):
    seed = int(os.environ.get("RESUME_TEST_SEED", random.SystemRandom().randrange(10 ** 6)))
    rng = random.Random(seed)
    # Anywhere in the first 48 of 88 iterations (the K = 10 phase and the K = 3 phase), leaving
    # the run enough iterations that it cannot finish before the kill even on a busy machine.
    kill_after, extra_delay = rng.randint(1, TOTAL - 40), rng.uniform(0, 0.06)
    context = f"RESUME_TEST_SEED={seed}: kill -9 after iteration {kill_after} + {extra_delay:.3f} s"
    folder = tmp_path / "out"
    args = base_args(sd_files, folder, *SUBPROCESS_FLAGS)

    proc = start(sd_files, args)
    wait_for_state(proc, folder, kill_after)
    time.sleep(extra_delay)                  # anywhere in an iteration, or in a state write
    proc.send_signal(signal.SIGKILL)
    code, _, _ = finish(proc)
    assert code == -signal.SIGKILL, context
    assert not (folder / "metrics.json").exists() and not (folder / "out_img.png").exists(), context
    killed_at = iterations_saved(folder)
    assert kill_after <= killed_at < TOTAL, context

    code, out, err = finish(start(sd_files, [*args, "--resume"]))
    assert code == 0, f"{context}\n{err}"
    assert f"({killed_at} of {TOTAL} iterations done)" in out, context
    assert_same_run(folder, reference)
    resumes = json.loads((folder / "metrics.json").read_text())["resumes"]
    assert [r["at_iteration"] for r in resumes] == [killed_at], context


@pytest.mark.slow
def test_sigterm_and_sigint_save_the_run_and_the_printed_command_resumes_it(sd_files, reference, tmp_path):
    folder = tmp_path / "out"
    rng = random.Random(int(os.environ.get("RESUME_TEST_SEED", "0")) + 1)

    proc = start(sd_files, base_args(sd_files, folder, *SUBPROCESS_FLAGS))
    wait_for_state(proc, folder, rng.randint(2, 30))
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 143, err
    assert "SIGTERM received: stopping after the current iteration" in err
    command = err.split("To resume:\n")[1].strip().splitlines()[0]
    assert command.startswith("python ") and command.endswith(" --resume")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["finished"] is False and metrics["stopped"]["reason"] == "SIGTERM"
    assert metrics["resume_command"] == command
    assert (folder / metrics["best"]["file"]).is_file()        # the best image so far
    assert (folder / STATE_FILE).is_file() and not (folder / "out_img.png").exists()
    assert (folder / "log.txt").read_text().splitlines()[-1].startswith("Interrupted by SIGTERM before timestep")

    # Without --resume or --overwrite the interrupted run is not touched.
    code, _, err = finish(start(sd_files, base_args(sd_files, folder, *SUBPROCESS_FLAGS)))
    assert code == 2 and "holds an interrupted run" in err and "--resume" in err

    # The printed command, as a user would paste it (python = this interpreter).
    resume_args = shlex.split(command)[2:]
    stopped_at = metrics["stopped"]["iterations_done"]
    proc = start(sd_files, resume_args)
    wait_for_state(proc, folder, stopped_at + rng.randint(2, 15))   # a state of the resumed run
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 130, err
    assert "stopped by SIGINT" in err and "To resume:" in err

    code, _, err = finish(start(sd_files, resume_args))
    assert code == 0, err
    assert_same_run(folder, reference)


# --- in-process: refusals, faults, atomic writes ------------------------------------------------

FAST_FLAGS = ["--optim_forward_guidance", "--optim_forward_guidance_wt", "4",
              "--optim_num_steps", "3", "1", "--optim_early_emp_end", "18", "--save_every", "2"]


class InterruptingExtractor(TinyExtractor):
    """Sends SIGINT to this process in its `at`-th forward (the first is the target's)."""

    name = "tiny"
    at = 10
    calls = 0

    def encode(self, x):
        type(self).calls += 1
        if type(self).calls == self.at:
            signal.raise_signal(signal.SIGINT)
        return super().encode(x)


def cli(extractor, args, capsys) -> tuple[int, str, str]:
    return run_cli(extractor, args, capsys)


@pytest.fixture
def interrupted(sd_files, tmp_path, capsys, request):
    """A folder holding a run stopped by SIGINT (in this process) after a few iterations."""
    request.applymarker(pytest.mark.signals_itself)
    folder = tmp_path / "out"
    InterruptingExtractor.calls = 0
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code, _, err = cli(InterruptingExtractor, base_args(sd_files, folder, *FAST_FLAGS), capsys)
    assert code == 130, err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert iterations_saved(folder) == 5           # SIGINT in iteration 5: stopped after it
    return folder


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")
    monkeypatch.setattr(cli_run, "load_decoder_models", refuse)


@pytest.mark.parametrize("change, message", [
    (["--optim_forward_guidance_wt", "5"], "--optim_forward_guidance_wt is 4.0 in the saved state but 5.0 now"),
    (["--optim_num_steps", "2", "2"], "--optim_num_steps is 3 1 in the saved state but 2 2 now"),
    (["--seed", "7"], "--seed is 42 in the saved state but 7 now"),
    (["--H", "32", "--W", "32"], "--H is 16 in the saved state but 32 now; --W is 16 in the saved state but 32 now"),
    (["--prompt", REPO / "data/examples/coffee.jpg"], "the target (--prompt) is the image"),
    (["--prompt", "a red car"], "but the text 'a red car' now"),
    ("other ckpt", "--ckpt is"),
    ("other config", "--config is"),
])
def test_resume_with_other_settings_target_or_checkpoint_is_refused(sd_files, interrupted, tmp_path,
                                                                    capsys, monkeypatch, change, message):
    args = base_args(sd_files, interrupted, *FAST_FLAGS, "--resume")
    if change == "other ckpt":
        state_dict = tiny_model(T, seed=1).state_dict()
        torch.save({"state_dict": state_dict}, tmp_path / "other.ckpt")
        change = ["--ckpt", tmp_path / "other.ckpt"]
    elif change == "other config":
        config = tiny_config(T)
        config.model.params.linear_end = 0.02
        OmegaConf.save(config, tmp_path / "other.yaml")
        change = ["--config", tmp_path / "other.yaml"]
    if change == ["--prompt", "a red car"]:
        extractor = type("TextTiny", (TinyExtractor,), {"encode_text": lambda self, p: None})
    else:
        extractor = TinyExtractor
    before = (interrupted / STATE_FILE).read_bytes()
    no_model_loads(monkeypatch)
    code, _, err = cli(extractor, [*args, *change], capsys)
    assert code == 2 and err.startswith("error: cannot resume: ") and message in err, err
    assert (interrupted / STATE_FILE).read_bytes() == before


def test_resume_then_finished(sd_files, interrupted, tmp_path, capsys, monkeypatch):
    args = base_args(sd_files, interrupted, *FAST_FLAGS)
    code, out, err = cli(TinyExtractor, [*args, "--resume"], capsys)
    assert code == 0, err
    assert "resuming before timestep" in out
    metrics = json.loads((interrupted / "metrics.json").read_text())
    assert metrics["finished"] is True and len(metrics["resumes"]) == 1
    assert not (interrupted / STATE_FILE).exists()
    # A finished run: --resume says so; without flags it is not overwritten.
    no_model_loads(monkeypatch)
    code, _, err = cli(TinyExtractor, [*args, "--resume"], capsys)
    assert code == 2 and "is finished" in err and "nothing to resume" in err
    code, _, err = cli(TinyExtractor, args, capsys)
    assert code == 2 and "already holds a finished run" in err


@pytest.mark.parametrize("case, message", [
    ("no state", "no resume state in"),
    ("corrupt state", "is not a readable resume state"),
    ("resume and overwrite", "give one of them"),
    ("interrupted, no flag", "holds an interrupted run (resume_state.safetensors, stopped at timestep"),
])
def test_resume_errors(sd_files, interrupted, tmp_path, capsys, monkeypatch, case, message):
    folder, extra = interrupted, ["--resume"]
    if case == "no state":
        folder = tmp_path / "empty"
    elif case == "corrupt state":
        (folder / STATE_FILE).write_bytes(b"not a safetensors file")
    elif case == "resume and overwrite":
        extra = ["--resume", "--overwrite"]
    else:
        extra = []
    no_model_loads(monkeypatch)
    code, _, err = cli(TinyExtractor, [*base_args(sd_files, folder, *FAST_FLAGS), *extra], capsys)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err


def test_overwrite_starts_an_interrupted_run_again(sd_files, interrupted, capsys):
    stale_best = [p.name for p in interrupted.glob("out_img_best_t_*.png")]
    assert stale_best and (interrupted / STATE_FILE).exists()
    code, _, err = cli(TinyExtractor, [*base_args(sd_files, interrupted, *FAST_FLAGS), "--overwrite"], capsys)
    assert code == 0, err
    metrics = json.loads((interrupted / "metrics.json").read_text())
    assert metrics["finished"] is True and metrics["resumes"] == []
    assert [p.name for p in interrupted.glob("out_img_best_t_*.png")] == [metrics["best"]["file"]]
    assert not (interrupted / STATE_FILE).exists()


class NaNExtractor(TinyExtractor):
    """Features turn NaN from the 12th forward on (the first is the target's)."""

    name = "tiny"
    calls = 0

    def encode(self, x):
        type(self).calls += 1
        features = super().encode(x)
        return features * float("nan") if type(self).calls >= 12 else features


def test_numerical_fault_stops_with_the_timestep_and_keeps_the_best_image(sd_files, tmp_path, capsys):
    folder = tmp_path / "out"
    NaNExtractor.calls = 0
    code, _, err = cli(NaNExtractor, base_args(sd_files, folder, *FAST_FLAGS), capsys)
    # Forwards 2..11 score iterations 1..5 (2 each); the 12th is iteration 6's first: the third
    # self-recurrence (j = 2) of timestep 18.
    assert code == 3
    assert err.startswith("error: non-finite values (NaN or inf) in the feature distance (target "
                          "model features) at timestep 18, self-recurrence 2")
    assert "Traceback" not in err
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["finished"] is False and metrics["stopped"]["reason"] == "numerical fault"
    assert metrics["stopped"]["timestep"] == 18 and metrics["stopped"]["iterations_done"] == 5
    best = folder / metrics["best"]["file"]
    assert best.is_file() and re.fullmatch(r"out_img_best_t_(19|18)_rec_\d(\.5)?_bk_-1_sim_-\d+\.\d{6}\.png", best.name)
    assert (folder / STATE_FILE).is_file() and not (folder / "out_img.png").exists()
    assert (folder / "log.txt").read_text().splitlines()[-1].startswith("Numerical fault: non-finite")
    assert all(math.isfinite(r.distance) for r in read_scores(folder / "log.txt"))   # nothing NaN logged


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_bytes(path, b"old")

    def crash(src, dst):
        raise OSError("killed during the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]     # no temporary left
