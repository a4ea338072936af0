"""The embedded default: the shipped toy LDM and extractors, the toy script, the quick benchmark."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from ldm.models.loading import load_model
from ldm.toy import world
from ldm.toy.defaults import TOY_CKPT, TOY_CONFIG
from ldm.toy.oracle import Oracle
from ldm.toy_build.ldm_training import sample_unguided

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_model():
    return load_model(REPO / TOY_CONFIG, REPO / TOY_CKPT)


def test_shipped_toy_ldm_loads_strictly(toy_model):
    assert toy_model.num_timesteps == 1000 and toy_model.latent_downsample_factor == 4
    assert toy_model.cond_stage_model is None
    # Its size, with every other toy model's: tests/test_toy_world.py::test_shipped_weights_are_small.


@pytest.mark.slow
def test_unguided_toy_samples_look_like_the_world(toy_model):
    torch.manual_seed(0)
    samples = sample_unguided(toy_model, 16, seed=3)
    assert samples.shape == (16, 3, 32, 32)
    clean = sum(r.clean for r in Oracle().read_batch(samples))
    assert clean >= 8, f"only {clean}/16 unguided samples read as one clean object"


def test_toy_script_end_to_end(tmp_path, capsys):
    folder = tmp_path / "out"
    argv = sys.argv
    sys.argv = ["toy_guided.py", "--extractor", "toy_colour", "--optim_forward_guidance",
                "--optim_timesteps", "30", "--optim_folder", str(folder), "--no_progress",
                "--prompt", str(REPO / "data/toy/toy_04_blue_circle.png"),
                "--config", str(REPO / TOY_CONFIG), "--ckpt", str(REPO / TOY_CKPT)]
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(REPO / "scripts/toy_guided.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_.value.code == 0, capsys.readouterr().err
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["extractor"] == "toy_colour" and metrics["finished"]
    assert metrics["best"]["cosine"] > 0.9
    reading = Oracle().read(world.load_image(str(folder / metrics["best"]["file"])))
    assert reading.colour == "blue"
