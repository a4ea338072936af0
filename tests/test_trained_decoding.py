"""The trained decoders through the command line and the Python API: `--decoder featinv` (FeatInv's
DDIM sampler) and `--decoder hybrid` (the guided sampler with the ControlNet as its denoiser), on
the shipped toy decoders and on a tiny SD-layout base, writing the standard run folder."""
import json

import pytest
import torch
from safetensors.torch import load_file

from ldm.api import decode
from ldm.featinv import FEATINV_PROMPT, DecoderRecord, new_decoder, save_decoder
from ldm.models.diffusion.trained_decoding import FeatInvDenoiser, sample_featinv
from ldm.objectives import FeatureDistance
from ldm.paths import shipped
from ldm.scorelog import read_scores
from ldm.toy.defaults import TOY_CKPT, TOY_CONFIG, TOY_DEFAULTS, TOY_FEATINV_DECODERS, TOY_PRESETS
from ldm.toy.extractors import TOY_EXTRACTORS
from tiny_models import TinyExtractor, run_cli, tiny_args, write_tiny_sd

TOY_CHOICES = {name: name for name in TOY_EXTRACTORS}
TOY_TARGET = str(shipped("data/toy/toy_00_red_circle.png"))


def toy_cli(argv, capsys):
    return run_cli(TOY_CHOICES, ["--no_progress", "--threads", "1", *argv], capsys, defaults=TOY_DEFAULTS,
                   presets=TOY_PRESETS, featinv_decoders=TOY_FEATINV_DECODERS)


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    """A tiny SD-layout base and a FeatInv decoder of TinyExtractor's pooled feature on it (random
    ControlNet weights, so that the hint matters)."""
    folder = write_tiny_sd(tmp_path_factory.mktemp("tiny_featinv"))
    record = DecoderRecord("tiny", None, False, (8, 1, 1), str(folder / "tiny.yaml"), 16, FEATINV_PROMPT)
    model = new_decoder(record, folder / "tiny.ckpt", folder / "tiny.yaml")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.control_model.parameters():
            p.normal_(0, 0.05)
    save_decoder(model, record, folder / "decoder.safetensors")
    return folder


def test_toy_featinv_writes_the_standard_run_folder(tmp_path, capsys):
    code, out, err = toy_cli(["--extractor", "toy_all", "--decoder", "featinv", "--featinv_steps", "10",
                              "--optim_folder", tmp_path], capsys)
    assert code == 0, err
    assert "10 FeatInv DDIM iterations" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["decoder"] == {"kind": "featinv", "extractor": "toy:all@body.17", "spatial": True,
                                  "steps": 10, "guidance_scale": 5.0, "file": TOY_FEATINV_DECODERS["toy_all"]}
    assert metrics["iterations"] == metrics["total_iterations"] == 10
    assert (tmp_path / "out_img.png").is_file() and metrics["final"]["reloaded_png"]["cosine"] > 0.5
    scores = read_scores(tmp_path / "log.txt")
    assert [s.stage for s in scores].count("estimate") == 10 and scores[-1].stage == "final"
    assert abs(scores[-1].cosine - metrics["final"]["cosine"]) < 1e-5
    assert load_file(str(tmp_path / "target_features.safetensors"))   # the target feature is kept


def test_toy_hybrid_takes_the_hybrid_preset_and_guides(tmp_path, capsys):
    code, out, err = toy_cli(["--extractor", "toy_all", "--decoder", "hybrid", "--optim_timesteps", "6",
                              "--optim_folder", tmp_path], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    settings = metrics["settings"]
    # The hybrid preset (forward guidance on, K = 1) with the toy's weight and guidance scale;
    # --optim_timesteps wins over the preset's 50.
    assert settings["forward_guidance"] and settings["forward_guidance_wt"] == 1.0
    assert settings["num_steps"] == [1] and settings["timesteps"] == 6
    assert metrics["decoder"]["kind"] == "hybrid" and metrics["decoder"]["guidance_scale"] == 3.0
    assert metrics["iterations"] == 6
    assert {s.stage for s in read_scores(tmp_path / "log.txt")} >= {"estimate", "guided", "final"}


def fingerprint(argv: list[str], tmp_path) -> dict:
    from ldm.cli.batch import Job
    from ldm.cli.command import _fingerprint, make_plan
    from ldm.cli.options import build_parser, parse_options
    from ldm.run_folder import RunFolder

    options = parse_options(build_parser("toy", TOY_DEFAULTS, extractor=TOY_CHOICES), argv, TOY_PRESETS)
    options.featinv_decoder = options.featinv_decoder or TOY_FEATINV_DECODERS[options.extractor]
    plan = make_plan(options.extractor, options, text_only=False, ckpt_hint="", argv=argv)
    return _fingerprint(plan, Job(plan.targets[0], RunFolder(tmp_path), "new"))


def test_the_trained_decoder_enters_the_fingerprint(tmp_path):
    """A resume must not switch decoders, decoder files or guidance scales; guided runs keep the
    fingerprint they had before the trained decoders existed (no new entries)."""
    hybrid = fingerprint(["--extractor", "toy_all", "--decoder", "hybrid"], tmp_path)
    assert {"--decoder", "--featinv_decoder", "--featinv_guidance"} <= set(hybrid)
    assert "--featinv_steps" not in hybrid      # the hybrid does not use it
    other = fingerprint(["--extractor", "toy_all", "--decoder", "hybrid", "--featinv_guidance", "2"], tmp_path)
    assert other["--featinv_guidance"] != hybrid["--featinv_guidance"]
    featinv = fingerprint(["--extractor", "toy_all", "--decoder", "featinv"], tmp_path)
    assert "--featinv_steps" in featinv and featinv["--decoder"] != hybrid["--decoder"]
    guided = fingerprint(["--extractor", "toy_all"], tmp_path)
    assert not {k for k in guided if "decoder" in k or "featinv" in k}


@pytest.mark.parametrize("extra, message", [
    (["--featinv_decoder", "nowhere.safetensors"], "no such file"),
    (["--featinv_decoder", TOY_FEATINV_DECODERS["toy_shape"], "--extractor", "toy_all"], None),
    (["--featinv_steps", "0"], "--featinv_steps"),
    (["--featinv_guidance", "nan"], "--featinv_guidance"),
])
def test_bad_trained_decoder_flags_are_clear_errors(tmp_path, capsys, extra, message):
    argv = ["--decoder", "featinv", *extra, "--optim_folder", tmp_path / "run"]
    code, _, err = toy_cli(argv, capsys)
    if message is None:   # toy_shape's decoder for toy_all: same network family? no: another model
        assert code == 2 and "decodes features of toy:shape@body.17" in err, err
    else:
        assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_featinv_without_a_decoder_file_says_how_to_get_one(tmp_path, capsys, tiny_decoder):
    code, _, err = run_cli(TinyExtractor, tiny_args(tiny_decoder, tmp_path, "--decoder", "featinv"), capsys)
    assert code == 2 and "--featinv_decoder" in err and "train_featinv.py" in err


@pytest.mark.parametrize("kind, extra, iterations", [
    ("featinv", ["--featinv_steps", "5"], 5),
    ("hybrid", ["--optim_timesteps", "4", "--optim_num_steps", "1", "--optim_early_emp_end", "-1"], 4),
])
def test_tiny_sd_decoders_run_through_the_cli(tmp_path, capsys, tiny_decoder, kind, extra, iterations):
    argv = tiny_args(tiny_decoder, tmp_path, "--decoder", kind, "--featinv_decoder",
                     tiny_decoder / "decoder.safetensors", *extra)
    code, out, err = run_cli(TinyExtractor, argv, capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["decoder"]["kind"] == kind and metrics["iterations"] == iterations
    assert (tmp_path / "out_img.png").is_file()


def test_the_hint_steers_featinv(tiny_decoder):
    """Two targets with different features give different images from the same seed."""
    from ldm.featinv import load_decoder

    model, _ = load_decoder(tiny_decoder / "decoder.safetensors", tiny_decoder / "tiny.ckpt",
                            tiny_decoder / "tiny.yaml")
    extractor = TinyExtractor()
    goals = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    context = model.get_learned_conditioning([FEATINV_PROMPT])
    denoiser = FeatInvDenoiser(model, goals[:, :, None, None], 1.75, context,
                               model.get_learned_conditioning([""]))
    generators = [torch.Generator().manual_seed(0) for _ in range(2)]   # the same noise for both
    result = sample_featinv(denoiser, FeatureDistance(extractor, goals), (2, 4, 8, 8), generators,
                            steps=4, progress=False)
    assert result.iterations == 4 and result.final_images.shape == (2, 3, 16, 16)
    assert (result.final_images[0] - result.final_images[1]).abs().max() > 1e-4
    assert all(best.image is not None for best in result.best)


def test_python_api_decodes_with_the_trained_decoder():
    results = decode([TOY_TARGET], "toy_all", decoder="featinv", featinv_decoder=TOY_FEATINV_DECODERS["toy_all"],
                     featinv_steps=10, featinv_guidance=5.0, config=TOY_CONFIG, ckpt=TOY_CKPT,
                     height=32, width=32, device="cpu", progress=False)
    assert results[0].final.shape == (3, 32, 32) and results[0].metrics["iterations"] == 10
    assert results[0].metrics["final"]["cosine"] > 0.5
    with pytest.raises(ValueError, match="featinv_decoder"):
        decode([TOY_TARGET], "toy_all", decoder="hybrid", config=TOY_CONFIG, ckpt=TOY_CKPT)


def test_featinv_runs_under_bf16(tiny_decoder, tmp_path, capsys):
    argv = tiny_args(tiny_decoder, tmp_path, "--decoder", "featinv", "--featinv_decoder",
                     tiny_decoder / "decoder.safetensors", "--featinv_steps", "3", "--precision", "bf16")
    code, _, err = run_cli(TinyExtractor, argv, capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["precision"] == "bf16" and -1 <= metrics["final"]["cosine"] <= 1


def test_mosaics_keep_the_decoders_apart(tmp_path, capsys):
    from ldm.figures import mosaic_layout
    from ldm.run_folder import load_run

    assert toy_cli(["--extractor", "toy_all", "--decoder", "featinv", "--featinv_steps", "4",
                    "--optim_folder", tmp_path / "featinv"], capsys)[0] == 0
    assert toy_cli(["--extractor", "toy_all", "--optim_timesteps", "3", "--optim_folder", tmp_path / "guided"],
                   capsys)[0] == 0
    layout = mosaic_layout([load_run(tmp_path / "guided"), load_run(tmp_path / "featinv")], 64)
    assert layout.groups == ["toy_all", "toy_all (featinv)"] and len(layout.rows) == 1


def test_a_decoder_kind_is_one_module_and_one_registry_line(tmp_path, capsys, monkeypatch):
    """docs/architecture.md's example kind, as written there, runs from the command line and
    the API with the shared run folder."""
    import re
    import sys
    import types

    from ldm.decoders import DECODER_KINDS

    page = (shipped("docs/architecture.md")).read_text()
    code = re.search(r"```python\n(# ldm/decoders/unguided.py.*?)```", page, re.S).group(1)
    module = types.ModuleType("ldm.decoders.unguided")
    exec(compile(code, "ldm/decoders/unguided.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "ldm.decoders.unguided", module)
    monkeypatch.setitem(DECODER_KINDS, "unguided", "ldm.decoders.unguided:Unguided")
    code, out, err = toy_cli(["--extractor", "toy_all", "--decoder", "unguided", "--optim_forward_guidance",
                              "--optim_timesteps", "4", "--optim_num_steps", "1", "--optim_folder", tmp_path], capsys)
    assert code == 0, err
    assert "4 guided iterations" in out       # the settings say guided; the kind drops the guidance
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["decoder"] == {"kind": "unguided"} and metrics["iterations"] == 4
    from ldm.models.diffusion.feature_guidance import GuidanceSettings

    results = decode([TOY_TARGET], "toy_all", decoder="unguided", config=TOY_CONFIG, ckpt=TOY_CKPT,
                     settings=GuidanceSettings(forward_guidance=True, timesteps=3), height=32, width=32,
                     device="cpu", progress=False)
    assert results[0].metrics["iterations"] == 3
