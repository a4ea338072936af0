"""Several targets per run: batches whose results do not depend on the batch, one folder per
target, reruns that skip finished targets, resumption of an interrupted batch, feature-file and
arithmetic targets, the Python API, and torchrun sharding (gloo, 2 processes)."""
import io
import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.api import decode
from ldm.cli import main
from ldm.cli.signals import StopOnSignals
from ldm.models.diffusion.feature_guidance import GuidanceSettings
from ldm.sharding import Shard, current_shard
from tiny_models import REPO, TinyExtractor, start_runner, tiny_model, write_tiny_sd

EXAMPLES = REPO / "data/examples"
IMAGES = [EXAMPLES / name for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")]
T = 20
FLAGS = ["--optim_forward_guidance", "--optim_forward_guidance_wt", "4", "--optim_grad_clip_threshold",
         "3", "--optim_num_steps", "3", "1", "--optim_early_emp_end", "15", "--optim_timesteps", "8",
         "--optim_select_prev", "--save_every", "2"]


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd"), T)


def args_for(sd_files, folder, *prompts, extra=()):
    return ["--config", sd_files / "tiny.yaml", "--ckpt", sd_files / "tiny.ckpt", "--H", "16", "--W", "16",
            "--device", "cpu", "--no_progress", "--optim_folder", folder, "--prompt", *prompts, *FLAGS,
            *extra]


def cli(args, capsys):
    code = main(TinyExtractor, argv=list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


def outputs(folder: Path) -> dict:
    """A run folder's images (bytes) and log lines without the wall time."""
    files = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    log = [line for line in (folder / "log.txt").read_text().splitlines()
           if not line.startswith(("Elapsed time", "Run options"))]
    return {"files": files, "log": log}


NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")


def assert_same_run(folder: Path, reference: Path, rtol: float = 0.0) -> None:
    """rtol 0: the same run bit for bit (log lines and PNG bytes). rtol > 0: the same run up to
    float rounding, for a different batch size: batched kernels sum in another order (a batch
    mate's content never matters, see test_feature_guidance), and guidance amplifies those
    roundings: the guidance gradient is rescaled to the noise norm, so where it is small its
    rounding noise is blown up to full size (on the tiny model: 1e-7 after one step, 1e-2 after
    eight; in float64 the batch and the single run agree to 1e-12, see below). So: short runs,
    numbers to `rtol`, images to a fraction of an 8-bit level on average."""
    got, want = outputs(folder), outputs(reference)
    if rtol == 0:
        assert got == want
        return
    assert len(got["log"]) == len(want["log"])
    for a, b in zip(got["log"], want["log"]):
        if "Found a better" in a:
            continue   # the moment of a new best may move with rounding
        assert NUMBER.sub("#", a) == NUMBER.sub("#", b), (a, b)
        assert np.allclose([float(x) for x in NUMBER.findall(a)], [float(x) for x in NUMBER.findall(b)],
                           rtol=rtol, atol=1e-6), (a, b)
    for name in ("out_img.png",):
        x, y = (np.asarray(Image.open(io.BytesIO(d["files"][name])), dtype=int) for d in (got, want))
        assert np.abs(x - y).mean() < 0.5 and np.abs(x - y).max() <= 8, name


@pytest.fixture(scope="module")
def alone(sd_files, tmp_path_factory):
    """Each image decoded on its own (the reference's one-target layout)."""
    root = tmp_path_factory.mktemp("alone")
    for image in IMAGES:
        assert main(TinyExtractor, argv=list(map(str, args_for(sd_files, root / image.stem, image)))) == 0
    return root


SHORT = ["--optim_timesteps", "2", "--optim_num_steps", "1"]   # before guidance amplifies roundings


def test_batch_of_three_equals_each_alone(sd_files, tmp_path, capsys):
    for image in IMAGES:
        assert cli(args_for(sd_files, tmp_path / "alone" / image.stem, image, extra=SHORT), capsys)[0] == 0
    code, out, err = cli(args_for(sd_files, tmp_path / "batch", *IMAGES, extra=["--batch_size", "3", *SHORT]),
                         capsys)
    assert code == 0, err
    for image in IMAGES:
        assert_same_run(tmp_path / "batch" / image.stem, tmp_path / "alone" / image.stem, rtol=1e-3)
        metrics = json.loads((tmp_path / "batch" / image.stem / "metrics.json").read_text())
        assert metrics["finished"] and metrics["batch_size"] == 3 and metrics["target"]["label"] == image.stem
    index = json.loads((tmp_path / "batch" / "index.json").read_text())
    assert [(e["label"], e["status"]) for e in index["targets"]] == [(i.stem, "finished") for i in IMAGES]


def test_rerun_skips_finished_targets_and_overwrite_redoes_them(sd_files, tmp_path, capsys):
    root = tmp_path / "study"
    code, out, err = cli(args_for(sd_files, root, *IMAGES[:2], extra=["--batch_size", "1"]), capsys)
    assert code == 0, err
    assert "batch 1 of 2: chelsea" in out and "batch 2 of 2: coffee" in out
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    code, out, err = cli(args_for(sd_files, root, *IMAGES), capsys)     # one more target
    assert code == 0, err
    assert "skipping 2 finished target(s)" in out and "chelsea, coffee" in out
    assert {p: p.stat().st_mtime_ns for p in before} == before           # untouched
    assert json.loads((root / "rocket" / "metrics.json").read_text())["finished"]
    code, out, err = cli(args_for(sd_files, root, *IMAGES), capsys)
    assert code == 0 and "nothing to decode" in out
    code, out, err = cli(args_for(sd_files, root, IMAGES[0], IMAGES[1], extra=["--overwrite"]), capsys)
    assert code == 0 and "Decoding 2 targets" in out


def test_interrupted_batch_resumes_to_the_same_result(sd_files, tmp_path, capsys, monkeypatch):
    polls = {"n": 0}

    def stop_after_some_iterations(self):
        polls["n"] += 1
        if polls["n"] == 7:
            self.signum = signal.SIGINT
        return self.signum is not None

    root = tmp_path / "run"
    args = args_for(sd_files, root, *IMAGES, extra=["--batch_size", "3"])
    assert cli(args_for(sd_files, tmp_path / "ref", *IMAGES, extra=["--batch_size", "3"]), capsys)[0] == 0
    with monkeypatch.context() as m:
        m.setattr(StopOnSignals, "__call__", stop_after_some_iterations)
        code, out, err = cli(args, capsys)
    assert code == 130 and "To resume:" in err and "--resume" in err
    for image in IMAGES:
        metrics = json.loads((root / image.stem / "metrics.json").read_text())
        assert metrics["finished"] is False and (root / image.stem / "resume_state.safetensors").is_file()
    code, _, err = cli(args, capsys)
    assert code == 2 and "interrupted runs of these targets" in err and "--resume" in err
    code, out, err = cli([*args, "--resume"], capsys)
    assert code == 0, err
    for image in IMAGES:
        assert_same_run(root / image.stem, tmp_path / "ref" / image.stem)
        metrics = json.loads((root / image.stem / "metrics.json").read_text())
        assert metrics["finished"] and len(metrics["resumes"]) == 1


def test_feature_file_and_arithmetic_targets(sd_files, alone, tmp_path, capsys):
    features = alone / "chelsea" / "target_features.safetensors"
    assert features.is_file()
    code, _, err = cli(args_for(sd_files, tmp_path / "file", features), capsys)
    assert code == 0, err
    assert_same_run(tmp_path / "file", alone / "chelsea")
    # a + 0 * (b - a) is exactly a: the same run as the image alone.
    expression = f'image("{IMAGES[0]}") + 0 * (image("{IMAGES[1]}") - image("{IMAGES[0]}"))'
    code, _, err = cli(args_for(sd_files, tmp_path / "expr", expression), capsys)
    assert code == 0, err
    assert_same_run(tmp_path / "expr", alone / "chelsea")
    metrics = json.loads((tmp_path / "expr" / "metrics.json").read_text())
    assert metrics["target"]["kind"] == "expression"
    np.save(tmp_path / "wrong.npy", np.zeros(5, np.float32))
    code, _, err = cli(args_for(sd_files, tmp_path / "wrong", tmp_path / "wrong.npy"), capsys)
    assert code == 2 and "the extractor's features have shape (1, 8)" in err


def test_cosine_loss_channel_subset_and_bf16_run(sd_files, tmp_path, capsys):
    code, _, err = cli(args_for(sd_files, tmp_path / "cos", IMAGES[0],
                                extra=["--loss", "cosine", "--channels", "0:4", "--precision", "bf16"]), capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "cos" / "metrics.json").read_text())
    assert metrics["objective"] == {"loss": "cosine", "channels": "0:4", "spatial": False}
    assert metrics["precision"] == "bf16"
    final = metrics["final"]
    assert final["loss"] == pytest.approx(1 - final["cosine"], abs=1e-5)
    assert final["squared_distance"] >= 0
    code, _, err = cli(args_for(sd_files, tmp_path / "bad", IMAGES[0], extra=["--channels", "0:9"]), capsys)
    assert code == 2 and "out of range for features with 8 channels" in err


def test_python_api(sd_files):
    model = tiny_model(T)
    settings = GuidanceSettings(forward_guidance=True, forward_guidance_wt=4.0, grad_clip_threshold=3.0,
                                num_steps=(3, 1), early_emp_end=15, timesteps=8, select_prev=True)
    extractor = TinyExtractor()
    results = decode([str(IMAGES[0]), str(IMAGES[1])], extractor, model=model, settings=settings,
                     height=16, width=16, device="cpu", progress=False)
    assert len(results) == 2
    for result in results:
        assert result.final.shape == (3, 16, 16) and 0 <= result.final.min() and result.final.max() <= 1
        assert result.metrics["final"]["squared_distance"] >= 0 and result.scores[-1].stage == "final"
        assert Decoded_to_pil_ok(result)
    unguided = decode(str(IMAGES[0]), extractor, model=model, height=16, width=16, device="cpu",
                      progress=False, settings=GuidanceSettings(num_steps=(3, 1), early_emp_end=15, timesteps=8))
    assert results[0].metrics["final"]["squared_distance"] < unguided[0].metrics["final"]["squared_distance"]


def Decoded_to_pil_ok(result) -> bool:
    image = result.to_pil(result.final)
    return image.size == (16, 16) and image.mode == "RGB"


# --- sharding ---------------------------------------------------------------------------------
def test_shard_takes_every_nth():
    items = list("abcdefg")
    assert [Shard(r, 3).take(items) for r in range(3)] == [list("adg"), list("be"), list("cf")]
    assert Shard().take(items) == items


def test_current_shard_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert current_shard() == Shard(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="not within WORLD_SIZE"):
        current_shard()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(sd_files, args) -> subprocess.CompletedProcess:
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    out, err = (proc := start_runner(sd_files, args, runner)).communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_torchrun_shards_targets_over_two_gloo_processes(sd_files, alone, tmp_path):
    for n in range(2):
        np.save(tmp_path / f"feature_{n}.npy", np.random.default_rng(n).normal(size=8).astype(np.float32))
    targets = [IMAGES[0], IMAGES[1], tmp_path / "feature_0.npy", tmp_path / "feature_1.npy"]
    root = tmp_path / "study"
    done = torchrun(sd_files, args_for(sd_files, root, *targets, extra=["--batch_size", "1"]))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}/2] batch 1 of 2" in done.stdout and f"[rank {rank}/2] batch 2 of 2" in done.stdout
    for label in ("chelsea", "coffee", "feature_0_npy", "feature_1_npy"):
        assert json.loads((root / label / "metrics.json").read_text())["finished"], label
    # Sharded results equal the same targets decoded alone in one process.
    assert_same_run(root / "chelsea", alone / "chelsea")
    index = json.loads((root / "index.json").read_text())
    assert {e["label"]: e["status"] for e in index["targets"]} == dict.fromkeys(
        ["chelsea", "coffee", "feature_0_npy", "feature_1_npy"], "finished")
    (root / "coffee" / "metrics.json").unlink()       # lose one result: a rerun redoes only it
    (root / "coffee" / "out_img.png").unlink()
    again = torchrun(sd_files, args_for(sd_files, root, *targets, extra=["--batch_size", "1"]))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipping 3 finished target(s)") == 2
    assert "nothing to decode" in again.stdout and "Decoding image target" in again.stdout
    assert json.loads((root / "coffee" / "metrics.json").read_text())["finished"]


# --- the sampler: a batch mate's content never matters ------------------------------------------
def guided_finals(dtype=torch.float32, n_goals=5):
    """→ final(rows): sample the goals of `rows` in one batch (w = 4, clipping, K = 3, z_prev
    selection), every image seeded 42; → (final images, final distances, best records)."""
    from ldm.models.diffusion.feature_guidance import sample_feature_guided
    from ldm.objectives import FeatureDistance

    model, extractor = tiny_model(T).to(dtype), TinyExtractor().to(dtype)
    goals = torch.randn(n_goals, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    settings = GuidanceSettings(forward_guidance=True, forward_guidance_wt=4.0, grad_clip_threshold=3.0,
                                num_steps=(3, 1), early_emp_end=15, timesteps=8, select_prev=True)
    cond = model.get_learned_conditioning([""])

    def final(rows):
        generators = [torch.Generator().manual_seed(42) for _ in rows]
        result = sample_feature_guided(model, cond, FeatureDistance(extractor, goals[rows]), settings,
                                       (len(rows), 4, 8, 8), generators, progress=False)
        return result.final_images, result.final_distance, result.best
    return final


def test_batch_mates_never_change_a_targets_result():
    """Same batch size, other targets beside it or another position in the batch: bit for bit
    the same result (every statistic is per image; each image has its own generator). Only the
    batch size may change float rounding (batched kernels), tested above with a tolerance."""
    final = guided_finals()
    a, _, best_a = final([0, 1, 2])
    b, _, best_b = final([0, 3, 4])
    c, _, best_c = final([2, 1, 0])
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[2]) and torch.equal(a[2], c[0])
    assert best_a[0].score == best_b[0].score == best_c[2].score


def test_batch_equals_alone_in_float64():
    """Batch of 3 vs each alone. In float32 the batch size changes kernel rounding, which
    guidance amplifies; in float64 the runs agree to 1e-9: nothing but rounding depends on the
    batch."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)   # the sampler's noise follows the default dtype
    try:
        final = guided_finals(torch.float64, n_goals=3)
        batch, distances, _ = final([0, 1, 2])
        for b in range(3):
            alone, distance, _ = final([b])
            assert torch.allclose(batch[b], alone[0], atol=1e-9, rtol=0)
            assert torch.allclose(distances[b], distance[0], atol=1e-9, rtol=0)
    finally:
        torch.set_default_dtype(default)


def test_python_api_takes_any_module_with_a_preprocessing():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    seen = []

    def preprocess(x):   # images in [0, 1], differentiable
        seen.append(x.shape)
        return (x - 0.5) / 0.5

    settings = GuidanceSettings(forward_guidance=True, forward_guidance_wt=2.0, num_steps=(2, 1),
                                early_emp_end=15, timesteps=4)
    results = decode(str(IMAGES[2]), net, preprocess=preprocess, model=tiny_model(T), settings=settings,
                     height=16, width=16, device="cpu", progress=False)
    assert len(results) == 1 and results[0].features.shape == (1, 6)
    assert results[0].final.shape == (3, 16, 16) and seen
    assert not any(p.requires_grad for p in net.parameters())     # frozen
