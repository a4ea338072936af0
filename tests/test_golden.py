"""Golden outputs: refactors change no numbers.

Five runs at one thread, recorded before the code was redesigned (tests/golden/outputs.json):
a tiny SD run with forward guidance and intermediates, one with backward guidance and
select_prev, a batch of two targets, a toy-world run, and the first run resumed from a resume
state written by the code of that time (tests/golden/resume/, committed). For every run the
SHA-256 of each PNG, of `log.txt` without its timing and option lines, of the target features,
and the scores of metrics.json must be what they were.

Floating-point results depend on the CPU's kernels, so the runs happen in a subprocess whose
kernels are pinned to AVX2 (ATen, oneDNN and MKL), which every x86-64 machine of this project
has; elsewhere the test is skipped with that reason. `GOLDEN_RECORD=1 pytest
tests/test_golden.py` records anew (only after a change that is meant to change numbers, said in
its commit).
"""
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden"
T = 20
FORWARD = ["--optim_forward_guidance", "--optim_forward_guidance_wt", "4",
           "--optim_grad_clip_threshold", "3", "--optim_num_steps", "4", "2",
           "--optim_early_emp_end", "16", "--optim_print"]
BACKWARD = ["--optim_forward_guidance", "--optim_backward_guidance", "--optim_max_iters", "2",
            "--optim_avg_sim_to_start_backward", "1e9", "--optim_sim_queue_size", "4",
            "--optim_lr", "0.05", "--optim_select_prev", "--optim_num_steps", "2"]
TARGETS = [REPO / "data/examples/chelsea.jpg", REPO / "data/examples/coffee.jpg"]
RESUME_AT = 30   # iterations done when the committed resume state was saved (of 4*4 + 16*2 = 48)
# Lines whose content is not a result: wall time and the command line as parsed.
UNSCORED = ("Elapsed time = ", "Run options: ")
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2",
                  "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --- the runs (in the subprocess) -----------------------------------------------------------------

def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def summary(folder: Path) -> dict:
    """What a run produced, as hashes and scores (recursively for multi-target folders)."""
    from safetensors.torch import load_file

    if not (folder / "metrics.json").is_file():
        return {child.name: summary(child) for child in sorted(folder.iterdir()) if child.is_dir()}
    log = [line for line in (folder / "log.txt").read_text().splitlines()
           if not line.startswith(UNSCORED)]
    metrics = json.loads((folder / "metrics.json").read_text())
    scores = {key: metrics[key] for key in ("finished", "iterations", "total_iterations",
                                            "guidance_gradient_guards", "feature_shape", "seed")}
    for image in ("final", "best"):
        entry = metrics[image]
        scores[image] = {k: entry[k] for k in ("file", "loss", "squared_distance", "cosine",
                                                "reloaded_png")}
    features = load_file(str(folder / "target_features.safetensors"))["features"]
    return {"png": {p.name: digest(p.read_bytes()) for p in sorted(folder.glob("*.png"))},
            "log": digest("\n".join(log).encode()), "log_lines": len(log),
            "features": digest(features.numpy().tobytes()), "metrics": scores}


def write_sd_files(folder: Path) -> Path:
    """The tiny SD stand-in as a config and a .safetensors file (byte-stable, so that the
    committed resume state's checkpoint fingerprint matches)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from tiny_models import tiny_config, tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(tiny_config(T), folder / "tiny.yaml")
    save_file(tiny_model(T).state_dict(), str(folder / "tiny.safetensors"))
    return folder


def tiny_args(sd_files: Path, folder: Path, *extra, prompt=(TARGETS[0],)) -> list[str]:
    return ["--config", str(sd_files / "tiny.yaml"), "--ckpt", str(sd_files / "tiny.safetensors"),
            "--H", "16", "--W", "16", "--device", "cpu", "--no_progress",
            "--prompt", *map(str, prompt), "--optim_folder", str(folder), *extra]


def run_tiny(sd_files: Path, folder: Path, *extra, prompt=(TARGETS[0],), code: int = 0) -> None:
    from ldm.cli import main
    from tiny_models import TinyExtractor

    assert main(TinyExtractor, argv=tiny_args(sd_files, folder, *extra, prompt=prompt)) == code


def golden_runs(sd_files: Path, root: Path) -> dict:
    from ldm.toy.extractors import TOY_EXTRACTORS
    from ldm.cli import main
    from ldm.toy.defaults import TOY_CKPT, TOY_CKPT_HINT, TOY_CONFIG, TOY_DEFAULTS

    run_tiny(sd_files, root / "forward", *FORWARD)
    run_tiny(sd_files, root / "backward", *BACKWARD)
    run_tiny(sd_files, root / "batch", *FORWARD, "--batch_size", "2", prompt=TARGETS)
    assert main({name: name for name in TOY_EXTRACTORS}, defaults=TOY_DEFAULTS, ckpt_hint=TOY_CKPT_HINT, argv=[
        "--extractor", "toy_all", "--optim_forward_guidance", "--optim_timesteps", "12",
        "--config", str(REPO / TOY_CONFIG), "--ckpt", str(REPO / TOY_CKPT), "--no_progress",
        "--prompt", str(REPO / TOY_DEFAULTS["prompt"]), "--optim_folder", str(root / "toy")]) == 0
    resumed = root / "resumed"
    shutil.copytree(GOLDEN / "resume", resumed)
    run_tiny(sd_files, resumed, *FORWARD, "--resume")
    names = ("forward", "backward", "batch", "toy", "resumed")
    return {name: summary(root / name) for name in names}


def record_resume_state(sd_files: Path, work: Path) -> None:
    """The forward run stopped as by SIGINT after RESUME_AT iterations: the folder as the code
    of the time left it (resume state, log, metrics.json, best image and intermediates so far)."""
    import ldm.cli.command as guided_run
    from ldm.run_folder import peek_run

    class StopAfter(guided_run.StopOnSignals):
        polls = 0

        def __call__(self):
            StopAfter.polls += 1
            if StopAfter.polls > RESUME_AT:
                self.signum = signal.SIGINT
            return self.signum is not None

    original, guided_run.StopOnSignals = guided_run.StopOnSignals, StopAfter
    try:
        run_tiny(sd_files, work, *FORWARD, code=130)
    finally:
        guided_run.StopOnSignals = original
    shutil.rmtree(GOLDEN / "resume", ignore_errors=True)
    shutil.copytree(work, GOLDEN / "resume")
    assert peek_run(GOLDEN / "resume" / "resume_state.safetensors")["sampler"]["iterations"] == RESUME_AT


def subprocess_main(mode: str, root: Path) -> None:
    sys.path.insert(0, str(TESTS))
    sd_files = write_sd_files(root / "sd")
    if mode == "record":
        record_resume_state(sd_files, root / "stopping")
    print(json.dumps(golden_runs(sd_files, root / "runs"), sort_keys=True))


# --- the test -------------------------------------------------------------------------------------

def golden_subprocess(mode: str, root: Path) -> dict:
    env = {**os.environ, **PINNED_KERNELS,
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, mode, str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_golden_outputs(tmp_path):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"golden outputs are pinned to x86-64 AVX2 kernels; this is {platform.machine()}")
    path = GOLDEN / "outputs.json"
    if os.environ.get("GOLDEN_RECORD") == "1":
        runs = golden_subprocess("record", tmp_path)
        assert runs["resumed"] == runs["forward"], "the resumed run must equal the uninterrupted one"
        path.write_text(json.dumps({"kernels": PINNED_KERNELS, "runs": runs}, indent=1,
                                   sort_keys=True) + "\n")
    golden = json.loads(path.read_text())["runs"]
    now = golden_subprocess("check", tmp_path / "check")
    for name in golden:   # one run at a time, so a failure names the run
        assert now[name] == golden[name], f"the {name!r} run changed"
    # The state written before the redesign continues to the uninterrupted run's very results.
    assert now["resumed"] == golden["forward"]


if __name__ == "__main__":
    subprocess_main(sys.argv[1], Path(sys.argv[2]))
