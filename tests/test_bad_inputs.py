"""Every bad input gets a clear error (exit code 2, `error: ...`, no traceback, no signal), raised
before any model is built wherever the input can be checked without one; nothing is lost
(a finished result is never overwritten by a failing rerun, two runs never share a folder);
odd but valid images (grey, palette, RGBA, 16-bit, 32-bit, float, EXIF-rotated) work. The table
of bad inputs in docs/bad-inputs.md lists the same cases."""
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import ldm.cli.command as command
import ldm.models.loading as loading
from ldm.extractors.base import FeatureExtractor
from ldm.extractors.preprocessing import Preprocessing, to_rgb
from ldm.extractors.clip import ClipRN50Extractor
from ldm.run_folder import RunFolder, names
from ldm.run_folder.state_file import FORMAT, VERSION
from ldm.targets import read_image
from tiny_models import (REPO, TARGET, TinyExtractor, run_cli, stopped_run, tiny_args, tiny_config, tiny_model,
                         write_tiny_sd)

T = 20
FAST = ["--optim_forward_guidance", "--optim_timesteps", "2"]


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd"), T)


def args_for(sd_files, folder, *extra, prompt=(TARGET,)) -> list[str]:
    return tiny_args(sd_files, folder, *FAST, *extra, prompt=prompt)


def cli(extractor, args, capsys, **kw):
    return run_cli(extractor, args, capsys, **kw)


def refuse_models(monkeypatch):
    """Fail the test if a model is built (the diffusion model or the target model)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the error")
    monkeypatch.setattr(loading, "build_model", refuse)   # load_model reads the file first
    monkeypatch.setattr(TinyExtractor, "__init__", refuse)


def files(tmp_path, sd_files):
    """Bad files for the table below."""
    made = {name: tmp_path / file for name, file in (
        ("half_ckpt", "half.ckpt"), ("garbage_safetensors", "garbage.safetensors"),
        ("half_png", "half.png"), ("a_file", "a_file"), ("binary_config", "binary.yaml"),
        ("evil_config", "evil.yaml"), ("long", "x" * 300 + ".png"))}
    data = (sd_files / "tiny.ckpt").read_bytes()
    made["half_ckpt"].write_bytes(data[: len(data) // 2])
    made["garbage_safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(64))
    png = TARGET.read_bytes()
    made["half_png"].write_bytes(png[: len(png) // 3])
    made["a_file"].write_text("not a folder")
    made["binary_config"].write_bytes(bytes(range(256)) * 4)
    evil = tiny_config(T)
    evil.model.params.unet_config.target = "os.system"
    evil.model.params.unet_config.params = {"command": f"touch {tmp_path / 'pwned'}"}
    loading.OmegaConf.save(evil, made["evil_config"])
    return made


# (flags, message): no model may be built and no folder created before these errors.
EARLY = [
    # checkpoint and config
    (["--ckpt", "{tmp}/nowhere.ckpt"], "Stable Diffusion v1.4 weights were not found at {tmp}/nowhere.ckpt"),
    (["--ckpt", "{half_ckpt}"], "the file is truncated or corrupt, re-download it"),
    (["--ckpt", "{garbage_safetensors}"], "invalid safetensors file"),
    (["--config", "{tmp}/nowhere.yaml"], "model config not found"),
    (["--config", "{binary_config}"], "is not a readable YAML file"),
    (["--config", "{evil_config}"], "model.params.unet_config.target 'os.system' is not one of this project's model classes"),
    (["--extractor_weights", "{tmp}/nowhere.pth"], "--extractor_weights '{tmp}/nowhere.pth': no such file"),
    # targets
    (["--prompt", "{tmp}/missing.png"], "looks like an image path, but no such file exists"),
    (["--prompt", "{tmp}"], "half.png' is not a readable image"),   # a folder: its images
    (["--prompt", REPO / "README.md"], "is not a readable image"),
    (["--prompt", "{half_png}"], "is not a readable image"),
    (["--prompt", "a photo of a dog"], "is not an image file, and tiny supports image targets only"),
    (["--prompt", ""], "empty target ''"),
    (["--prompt", "{long}"], "looks like an image path, but no such file exists"),   # 300-byte name
    (["--prompt", "a long caption " * 30], "is not an image file, and tiny supports image targets only"),
    (["--prompt", "a photo of an image (blurry)"], "'a photo of an image (blurry)' is not an image file"),
    (["--prompt", f'image("{TARGET}") * (1 / 0)'], "'1 / 0' divides by zero"),
    (["--prompt", f'image + image("{TARGET}")'], "'image' alone is not a term"),
    # sizes and schedule
    (["--H", "18"], "--H 18 must be a multiple of 4 (the first stage down-samples by 2, the UNet by 2 more)"),
    (["--W", "0"], "--W: 0 is not from 1"),
    (["--optim_num_steps", "0"], "--optim_num_steps: must be an integer from 1"),
    (["--optim_num_steps", "8", "-1"], "--optim_num_steps: must be an integer from 1"),
    (["--optim_num_steps", "1", "2", "3"], "--optim_num_steps: takes one or two values"),
    (["--optim_early_emp_end", "21"], "--optim_early_emp_end: 21 is past the model's last timestep index 19"),
    (["--optim_early_emp_end", "-2"], "--optim_early_emp_end: must be an integer from -1"),
    (["--optim_timesteps", "0"], "--optim_timesteps: must be an integer from 1"),
    (["--optim_timesteps", "5000"], "--optim_timesteps: 5000 is more than the model's 20 timesteps"),
    (["--optim_sim_queue_size", "0"], "--optim_sim_queue_size: must be an integer from 1 to 1,000,000"),
    (["--optim_sim_queue_size", "10000000000"], "--optim_sim_queue_size: must be an integer from 1 to 1,000,000"),
    # numbers
    (["--optim_lr", "nan"], "--optim_lr: must be a finite number > 0, got nan"),
    (["--optim_lr", "-1"], "--optim_lr: must be a finite number > 0, got -1.0"),
    (["--optim_forward_guidance_wt", "inf"], "--optim_forward_guidance_wt: must be a finite number, got inf"),
    (["--optim_grad_clip_threshold", "nan"], "--optim_grad_clip_threshold: must be a finite number"),
    (["--optim_loss_cutoff", "nan"], "--optim_loss_cutoff: must be a finite number >= 0"),
    (["--optim_avg_sim_to_start_backward", "nan"], "--optim_avg_sim_to_start_backward: must be a finite number"),
    (["--seed", "-1"], "--seed: -1 is not from 0 to 18,446,744,073,709,551,615"),
    (["--seed", str(2 ** 64)], "--seed: 18446744073709551616 is not from 0"),
    (["--save_every", "0"], "--save_every: 0 is not from 1"),
    (["--batch_size", "0"], "--batch_size: 0 is not from 1"),
    (["--threads", "0"], "--threads: 0 is not from 1"),
    (["--channels", "0:x"], "--channels: channel subset '0:x'"),
    # output folder
    (["--optim_folder", "{a_file}/out"], "cannot write to --optim_folder"),
    (["--optim_folder", "{a_file}"], "cannot write to --optim_folder"),
    # device
    (["--device", "cuda:7"], "--device 'cuda:7' is not available here"),
    (["--device", "nonsense"], "--device: 'nonsense' is not one of cpu, cuda, mps"),
    (["--device", "meta"], "--device: 'meta' is not one of cpu, cuda, mps"),
    (["--resume", "--overwrite"], "give one of them"),
]


@pytest.mark.parametrize("flags, message", EARLY, ids=[" ".join(map(str, f)).replace(str(REPO), "")[:60]
                                                       for f, _ in EARLY])
def test_bad_input_fails_early_with_a_clear_error(sd_files, tmp_path, capsys, monkeypatch, flags, message):
    made = {k: str(v) for k, v in files(tmp_path, sd_files).items()}
    fill = lambda s: str(s).format(tmp=tmp_path, **made)  # noqa: E731
    folder = tmp_path / "out"
    refuse_models(monkeypatch)
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, folder), *map(fill, flags)], capsys)
    assert code == 2, err
    assert err.startswith(("error: ", "warning: ")) and fill(message) in err, err
    assert "Traceback" not in err
    assert not folder.exists()     # nothing was created either
    assert not (tmp_path / "pwned").exists()   # and nothing a config names was run


def test_malformed_flags_are_argparse_errors(sd_files, tmp_path, capsys):
    for flags, message in ((["--optim_num_steps"], "expected at least one argument"),
                           (["--optim_sim_queue_size", "1e10"], "invalid int value: '1e10'"),
                           (["--fixed_code"], "the reference parses these but never uses them")):
        with pytest.raises(SystemExit) as exit_:
            cli(TinyExtractor, [*args_for(sd_files, tmp_path / "out"), *flags], capsys)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_early_emp_end_bounds_are_accepted(sd_files, tmp_path, capsys):
    """-1 (the reference's default: the first K everywhere) up to the model's T are accepted."""
    for value in ("-1", "0", "19", "20"):
        code, _, err = cli(TinyExtractor, [*args_for(sd_files, tmp_path / value), "--optim_early_emp_end",
                                           value], capsys)
        assert code == 0, err


@pytest.mark.skipif(getattr(os, "geteuid", lambda: 1)() == 0, reason="root can write into read-only folders")
def test_read_only_output_folder(sd_files, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    try:
        code, _, err = cli(TinyExtractor, args_for(sd_files, folder), capsys)
    finally:
        folder.chmod(0o700)
    assert code == 2 and "cannot write to --optim_folder" in err


@pytest.mark.parametrize("make, message", [
    (lambda f: os.symlink("/tmp/elsewhere.txt", f / names.LOG), "is a symbolic link; outputs are never written through links"),
    (lambda f: (f / names.FINAL).mkdir(), "is a folder, but the run writes a file of that name"),
])
def test_output_names_that_are_links_or_folders_are_refused(sd_files, tmp_path, capsys, monkeypatch, make, message):
    folder = tmp_path / "out"
    folder.mkdir()
    make(folder)
    refuse_models(monkeypatch)
    code, _, err = cli(TinyExtractor, args_for(sd_files, folder), capsys)
    assert code == 2 and message in err, err
    assert not Path("/tmp/elsewhere.txt").exists()


def test_checkpoint_of_another_architecture_names_the_keys(sd_files, tmp_path, capsys):
    config = tiny_config(T)
    config.model.params.unet_config.params.model_channels = 64
    torch.manual_seed(0)
    torch.save({"state_dict": loading.build_model(config).state_dict()}, tmp_path / "narrow.ckpt")
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, tmp_path / "a"), "--ckpt", tmp_path / "narrow.ckpt"], capsys)
    assert code == 2 and "does not look like a checkpoint for this model" in err
    assert "model.diffusion_model.input_blocks.0.0.weight: file (64, 4, 3, 3) vs model (32, 4, 3, 3)" in err
    save_file(TinyExtractor().state_dict(), str(tmp_path / "classifier.safetensors"))
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, tmp_path / "b"),
                                       "--ckpt", tmp_path / "classifier.safetensors"], capsys)
    assert code == 2 and "missing from the file" in err and "net.0.weight (8, 3, 3, 3)" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd["model.diffusion_model.out.2.weight"].to(torch.int8), "model.diffusion_model.out.2.weight: torch.int8"),
    (lambda sd: sd["model.diffusion_model.out.2.weight"] * float("nan"), "model.diffusion_model.out.2.weight: holds NaN or inf"),
])
def test_integer_or_nan_weights_are_refused(sd_files, tmp_path, capsys, change, message):
    state_dict = dict(tiny_model(T).state_dict())
    state_dict["model.diffusion_model.out.2.weight"] = change(state_dict)
    save_file(state_dict, str(tmp_path / "bad.safetensors"))
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, tmp_path / "out"), "--ckpt", tmp_path / "bad.safetensors"], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


# --- targets that can only be judged by their features (after the models load) ---------------------

@pytest.mark.slow
@pytest.mark.parametrize("make, extra, message", [
    (lambda p: np.save(p.with_suffix(".npy"), np.full(8, np.nan, np.float32)), [], "holds NaN or inf values"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros(8, np.float32)), ["--loss", "cosine"], "is zero everywhere"),
    (lambda p: np.save(p.with_suffix(".npy"), np.r_[np.zeros(4), np.ones(4)].astype(np.float32)),
     ["--channels", "0:4"], "is zero everywhere on the compared channels"),
    (lambda p: torch.save(torch.ones(8).to_sparse(), p.with_suffix(".pt")), [], "holds a torch.sparse_coo tensor"),
    (lambda p: torch.save(torch.ones(8, device="meta"), p.with_suffix(".pt")), [], "on meta"),
])
def test_unusable_target_features_are_refused_before_sampling(sd_files, tmp_path, capsys, make, extra, message):
    make(tmp_path / "target")
    target = next(tmp_path.glob("target.*"))
    folder = tmp_path / "out"
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, folder, prompt=(target,)), *extra], capsys)
    assert code == 2 and message in err, err
    assert not folder.exists()           # no folder marked as a run


# --- nothing is lost -------------------------------------------------------------------------------

def test_generated_folder_names_never_collide(sd_files, tmp_path, capsys):
    """a/x.png, b/x.png and x_2.png: the generated name of the second x skips the x_2 a target has;
    a target named index.json.png does not take the place of index.json."""
    sources = []
    for where, name in (("a", "x.png"), ("b", "x.png"), ("c", "x_2.png"), ("d", "index.json.png")):
        (tmp_path / where).mkdir()
        Image.open(TARGET).save(tmp_path / where / name)
        sources.append(tmp_path / where / name)
    root = tmp_path / "study"
    code, _, err = cli(TinyExtractor, args_for(sd_files, root, prompt=sources), capsys)
    assert code == 0, err
    index = json.loads((root / names.INDEX).read_text())
    folders = {Path(e["source"]).relative_to(tmp_path).as_posix(): e["folder"] for e in index["targets"]}
    assert folders == {"a/x.png": "x", "b/x.png": "x_3", "c/x_2.png": "x_2", "d/index.json.png": "index.json_2"}
    assert all(json.loads((root / f / "metrics.json").read_text())["finished"] for f in folders.values())


def test_a_second_run_into_a_folder_in_use_is_refused(sd_files, tmp_path, capsys):
    folder = RunFolder(tmp_path / "out")
    folder.create()
    folder.lock()                       # another process writing it
    try:
        code, _, err = cli(TinyExtractor, args_for(sd_files, folder.path), capsys)
    finally:
        folder.unlock()
    assert code == 2 and "is being written by process" in err and str(os.getpid()) in err
    code, _, err = cli(TinyExtractor, args_for(sd_files, folder.path), capsys)
    assert code == 0, err


class BrokenExtractor(TinyExtractor):
    """Fails in the middle of sampling (its 5th forward), as a bug or an out-of-memory would."""

    calls = 0

    def encode(self, x):
        type(self).calls += 1
        if type(self).calls == 5:
            raise RuntimeError("out of memory (simulated)")
        return super().encode(x)


def test_overwrite_keeps_the_old_results_until_the_new_run_has_its_own(sd_files, tmp_path, capsys):
    folder = tmp_path / "out"
    assert cli(TinyExtractor, args_for(sd_files, folder), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != names.LOCK}
    # A rerun that fails to load keeps everything.
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, folder), "--overwrite", "--ckpt", tmp_path / "no.ckpt"], capsys)
    assert code == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != names.LOCK} == before
    # A rerun that fails while sampling puts the old results back.
    BrokenExtractor.calls = 0
    with pytest.raises(RuntimeError, match="simulated"):
        cli(BrokenExtractor, [*args_for(sd_files, folder), "--overwrite", "--seed", "7"], capsys)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != names.LOCK} == before
    assert not (folder / names.SET_ASIDE).exists()
    # A rerun that finishes replaces them.
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, folder), "--overwrite", "--seed", "7"], capsys)
    assert code == 0, err
    assert json.loads((folder / "metrics.json").read_text())["seed"] == 7
    assert not (folder / names.SET_ASIDE).exists()


def test_outputs_set_aside_by_a_killed_overwrite_come_back(sd_files, tmp_path, capsys):
    folder = tmp_path / "out"
    assert cli(TinyExtractor, args_for(sd_files, folder), capsys)[0] == 0
    aside = folder / names.SET_ASIDE
    aside.mkdir()
    for path in RunFolder(folder).outputs():
        os.replace(path, aside / path.name)          # as a SIGKILL right after setting aside leaves it
    code, _, err = cli(TinyExtractor, args_for(sd_files, folder), capsys)
    assert code == 2 and "already holds a finished run" in err
    assert (folder / "metrics.json").is_file() and not aside.exists()


# --- resume states that cannot be trusted ----------------------------------------------------------

def interrupted(sd_files, folder: Path, capsys, monkeypatch) -> None:
    """A run stopped (as by SIGINT) after 3 iterations."""
    code, _, err = stopped_run(TinyExtractor, [*args_for(sd_files, folder), "--optim_timesteps", "6"],
                               capsys, monkeypatch)
    assert code == 130, err


def edit_state(path: Path, change) -> None:
    """Rewrite a state file with `change(tensors, sampler)` applied, keeping its fingerprint."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    sampler = json.loads(metadata["sampler"])
    change(tensors, sampler)
    save_file(tensors, str(path), metadata={**metadata, "sampler": json.dumps(sampler)})


@pytest.mark.parametrize("change, message", [
    (lambda t, s: t.update(z=t["z"][..., :2].contiguous()), "resume state for latents (1, 4, 8, 2), not (1, 4, 8, 8)"),
    (lambda t, s: t.update(z=t["z"] * float("nan")), "z holds NaN or inf"),
    (lambda t, s: t.update({"generator.0": t["generator.0"][:100]}), "generator.0 holds 100 bytes"),
    (lambda t, s: s.update(iterations=4), "says 4 iterations are done"),
    (lambda t, s: s.update(k=99), "schedule position 99"),
    (lambda t, s: s.update(batch=2), "incomplete resume state"),
    (lambda t, s: t.update(history=t["history"].double()), "history is not a torch.float32 tensor"),
])
def test_edited_resume_states_are_refused_before_the_folder_changes(sd_files, tmp_path, capsys, monkeypatch,
                                                                     change, message):
    folder = tmp_path / "out"
    interrupted(sd_files, folder, capsys, monkeypatch)
    edit_state(folder / names.STATE, change)
    files_now = lambda: {p.name: p.read_bytes() for p in folder.iterdir()  # noqa: E731
                         if p.is_file() and p.name != names.LOCK}
    before = files_now()
    monkeypatch.setattr(command, "load_decoder_models", lambda *a, **k: pytest.fail("a model was loaded"))
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, folder), "--optim_timesteps", "6", "--resume"], capsys)
    assert code == 2 and "cannot resume" in err and message in err, err
    assert files_now() == before   # log.txt too


def test_state_of_another_format_is_refused(sd_files, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out"
    interrupted(sd_files, folder, capsys, monkeypatch)
    from safetensors import safe_open
    with safe_open(str(folder / names.STATE), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert metadata["format"] == FORMAT and metadata["version"] == VERSION
    save_file(tensors, str(folder / names.STATE), metadata={**metadata, "version": "9"})
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, folder), "--optim_timesteps", "6", "--resume"], capsys)
    assert code == 2 and "format version 9" in err


def test_a_full_disk_while_saving_the_state_is_reported_and_the_old_state_kept(sd_files, tmp_path, capsys, monkeypatch):
    import ldm.run_folder.state_file as state_file
    real, calls = state_file.atomic_write, {"n": 0}

    def full_after_the_first(path, write):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(28, "No space left on device")
        real(path, write)

    monkeypatch.setattr(state_file, "atomic_write", full_after_the_first)
    folder = tmp_path / "out"
    code, out, err = cli(TinyExtractor, [*args_for(sd_files, folder), "--optim_timesteps", "6",
                                         "--save_every", "1"], capsys)
    assert code == 0, err                          # periodic saves failing do not stop the run
    assert "No space left on device" in out and "the previous resume state is intact" in out


# --- images that work -------------------------------------------------------------------------

def _png_16bit_rgb(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda tag, data: (struct.pack(">I", len(data)) + tag + data  # noqa: E731
                               + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def odd_images(tmp_path: Path) -> dict[str, tuple[Path, Image.Image]]:
    """name → (file, the 8-bit upright RGB image it should read as)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    rgb[:, :8] = [255, 0, 0]                   # not symmetric: rotations are visible
    base = Image.fromarray(rgb)
    grey = base.convert("L")
    levels = np.asarray(grey).astype(np.float64) / 255
    out = {}

    def add(name, image, expected, **save):
        path = tmp_path / name
        image.save(path, **save)
        out[name] = (path, expected)

    add("grey.png", grey, grey.convert("RGB"))
    palette = base.quantize(16)
    add("palette.png", palette, palette.convert("RGB"))
    rgba = base.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (24, 40), dtype=np.uint8)))
    add("rgba.png", rgba, base)                 # alpha dropped, as .convert("RGB") does
    add("grey_alpha.png", grey.convert("LA"), grey.convert("RGB"))
    add("grey16.png", Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), grey.convert("RGB"))
    add("float32.tif", Image.fromarray(levels.astype(np.float32)), grey.convert("RGB"))
    add("int32.tif", Image.fromarray(np.round(levels * (2 ** 31 - 1)).astype(np.int32)), grey.convert("RGB"))
    _png_16bit_rgb(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 257)
    out["rgb16.png"] = (tmp_path / "rgb16.png", base)
    add("cmyk.jpg", base.convert("CMYK"), None, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6                            # "rotate 90° clockwise to display"
    add("rotated.jpg", base, None, exif=exif, quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        out["cmyk.jpg"] = (tmp_path / "cmyk.jpg", im.convert("RGB"))
    with Image.open(tmp_path / "rotated.jpg") as im:
        out["rotated.jpg"] = (tmp_path / "rotated.jpg", im.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    return out


MODES = {"grey.png": "L", "palette.png": "P", "rgba.png": "RGBA", "grey_alpha.png": "LA",
         "grey16.png": "I;16", "float32.tif": "F", "int32.tif": "I", "rgb16.png": "RGB",
         "cmyk.jpg": "CMYK", "rotated.jpg": "RGB"}


def test_odd_images_read_as_upright_8bit_rgb(tmp_path):
    for name, (path, expected) in odd_images(tmp_path).items():
        with Image.open(path) as image:
            assert image.mode == MODES[name], name
        rgb = read_image(str(path))
        assert rgb.mode == "RGB" and rgb.size == expected.size, name
        assert np.array_equal(np.asarray(rgb), np.asarray(expected)), name
    # High-bit-depth and float images are scaled, not clipped (to white, or to black for floats).
    for name, clipped in (("grey16.png", "white"), ("int32.tif", "white"), ("float32.tif", "black")):
        with Image.open(tmp_path / name) as image:
            naive = np.asarray(image.convert("RGB")).mean()
            assert (naive > 250 if clipped == "white" else naive < 5), name
            assert 20 < np.asarray(to_rgb(image)).mean() < 235, name
    extractor = TinyExtractor()
    assert torch.equal(extractor.preprocess_image(read_image(str(tmp_path / "grey16.png"))),
                       extractor.preprocess_image(Image.open(tmp_path / "grey.png")))


def test_float_images_outside_the_unit_range_are_refused(tmp_path):
    Image.fromarray(np.full((8, 8), 300.0, np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(ValueError, match=r"values in \[300, 300\]"):
        read_image(str(tmp_path / "hdr.tif"))


@pytest.mark.parametrize("name", list(MODES))
def test_odd_images_work_end_to_end(sd_files, tmp_path, capsys, name):
    path, _ = odd_images(tmp_path)[name]
    code, _, err = cli(TinyExtractor, args_for(sd_files, tmp_path / "out", prompt=(path,)), capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["finished"] is True and metrics["target"]["source"] == str(path)


# --- long text prompts ------------------------------------------------------------------------

class _TinyClipModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.token_embedding = nn.Embedding(49408, 8)

    def encode_image(self, x, normalize=False):
        return self.visual(x)

    def encode_text(self, tokens, normalize=False):
        return self.token_embedding(tokens).mean(1)


class TinyClip(ClipRN50Extractor):
    """The CLIP extractor's text path (open_clip's RN50 tokenizer, 77 tokens) on a tiny model."""

    name = "tiny_clip"
    preprocessing = Preprocessing(input_size=16, mean=ClipRN50Extractor.preprocessing.mean,
                                  std=ClipRN50Extractor.preprocessing.std)

    def __init__(self, weights=None, device="cpu"):
        FeatureExtractor.__init__(self)
        import open_clip
        torch.manual_seed(0)
        self.model = _TinyClipModel()
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        self.freeze().to(device)


def test_long_prompts_and_captions_are_text(sd_files, tmp_path, capsys):
    long_prompt = " ".join(["a red car parked next to a small blue house"] * 10)   # 100+ tokens
    code, _, err = cli(TinyClip, args_for(sd_files, tmp_path / "long", prompt=(long_prompt,)), capsys)
    assert code == 0, err
    assert "warning: text prompt of " in err and "truncated to 77 tokens" in err
    caption = "a photo of an image (blurry) " + "x" * 300    # parentheses, and a 300-byte "name"
    code, _, err = cli(TinyClip, args_for(sd_files, tmp_path / "caption", prompt=(caption,)), capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "caption" / "metrics.json").read_text())
    assert metrics["target"] == {"kind": "text", "source": caption, "label": metrics["target"]["label"]}
