"""What a researcher hits in the first hour: a weights file gets the preprocessing of the weights
it holds, torchvision's own (older) files load, generated images are preprocessed as the targets
are, the scripts run from any folder, and the README's small promises hold."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import MobileNet_V2_Weights

from ldm.api import _targets
from ldm.cli.options import PAPER, RunOptions, build_parser, parse_options
from ldm.extractors import build_extractor
from ldm.paths import shipped

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def mobilenet_state():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2().state_dict()


def sizes(extractor) -> tuple:
    p = extractor.preprocessing
    return p.input_size, p.resize_size, p.interpolation.value


@pytest.mark.parametrize("name, tag, expected", [
    ("mobilenet_v2-b0353104.pth", None, "IMAGENET1K_V1"),      # torchvision's own file name
    ("mobilenet_v2-7ebf99e0.pth", None, "IMAGENET1K_V2"),
    ("my_weights.pth", "IMAGENET1K_V1", "IMAGENET1K_V1"),      # named by --weights_tag
    ("my_weights.pth", None, "IMAGENET1K_V2"),                 # unknown name: the library's default
])
def test_a_weights_file_gets_the_transforms_of_its_tag(tmp_path, mobilenet_state, name, tag, expected):
    path = tmp_path / name
    torch.save(mobilenet_state, path)
    extractor = build_extractor("torchvision:mobilenet_v2", weights=str(path), weights_tag=tag)
    assert extractor.weights_tag == expected
    own = MobileNet_V2_Weights[expected].transforms()
    assert sizes(extractor) == (own.crop_size[0], own.resize_size[0], own.interpolation.value)


def test_torchvision_legacy_format_files_load(tmp_path, mobilenet_state):
    """torchvision's older files use torch's pre-1.6 serialisation; the weights-only loader reads them."""
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(mobilenet_state, path, _use_new_zipfile_serialization=False)
    extractor = build_extractor("torchvision:mobilenet_v2", weights=str(path))
    first = next(iter(mobilenet_state))
    torch.testing.assert_close(extractor.model.state_dict()[first], mobilenet_state[first])


def test_the_resolved_preprocessing_goes_into_metrics(tmp_path, mobilenet_state):
    from ldm.cli.command import extractor_details

    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(mobilenet_state, path)
    options = RunOptions(extractor_weights=str(path))
    details = extractor_details(build_extractor("torchvision:mobilenet_v2", weights=str(path)), options)
    assert details["weights_tag"] == "IMAGENET1K_V1" and details["preprocessing"]["resize_size"] == 256
    assert details["weights_file"].startswith(f"{path.stat().st_size} bytes, sha256")


def test_generated_images_are_preprocessed_as_the_targets(tmp_path, mobilenet_state):
    """Generic models: a generated image's feature is that of its saved PNG read as a target."""
    from PIL import Image

    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(mobilenet_state, path)
    extractor = build_extractor("torchvision:mobilenet_v2", weights=str(path))
    images = torch.rand(1, 3, 300, 200) * 2 - 1
    pixels = ((images[0] + 1) / 2 * 255).round().byte()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(tmp_path / "out.png")
    with torch.no_grad():
        generated = extractor(images)
        reloaded = extractor.image_features(Image.open(tmp_path / "out.png"))
    torch.testing.assert_close(generated, reloaded, rtol=1e-4, atol=1e-4)


def test_paper_flag_gives_the_readme_commands_settings():
    options = parse_options(build_parser("x"), ["--paper"])
    for name, value in PAPER.items():
        assert getattr(options, name) == value, name
    settings = options.settings()
    assert settings.total_iterations(1000) == 12_960
    explicit = parse_options(build_parser("x"), ["--paper", "--optim_grad_clip_threshold", "2.0"])
    assert explicit.optim_grad_clip_threshold == 2.0      # a flag given wins over the preset


def test_a_folder_in_a_list_of_targets_expands_to_every_image():
    items = _targets([str(shipped("data/examples/chelsea.jpg")), str(shipped("data/toy"))])
    toy = sorted(p.name for p in shipped("data/toy").glob("*.png"))
    assert len(items) == 1 + len(toy)
    assert [Path(t.source).name for t in items[1:]] == toy


def test_scripts_run_from_another_folder(tmp_path):
    """The defaults (config, checkpoint, target) are the installed project's, not the cwd's."""
    done = subprocess.run([sys.executable, str(REPO / "scripts/toy_guided.py"), "--extractor", "toy_shape",
                           "--optim_timesteps", "3", "--optim_folder", "out", "--no_progress"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["finished"]


def test_list_layers_command_runs():
    done = subprocess.run([sys.executable, "-m", "ldm", "list-layers", "torchvision:resnet18"],
                          cwd="/", env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "layer3.1" in done.stdout.split()


def test_readme_is_a_landing_page_whose_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    import re
    links = re.findall(r"\]\(((?:docs|data|scripts)/[^)#]+)\)", readme)
    assert links and all((REPO / link).exists() for link in links), [l for l in links if not (REPO / l).exists()]
    for page in (REPO / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#:]+\.md)\)", page.read_text()):
            assert (page.parent / link).exists(), (page.name, link)


def test_rebuilding_the_toy_models_never_replaces_the_shipped_ones_by_default(tmp_path, monkeypatch):
    from ldm.toy_build import build

    shipped_samples = {p.name: p.stat().st_mtime_ns for p in shipped("data/toy").iterdir()}
    monkeypatch.chdir(tmp_path)
    build.main(["--only", "samples"])
    assert (tmp_path / "outputs/toy_models/samples/toy_00_red_circle.png").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in shipped("data/toy").iterdir()} == shipped_samples
    ctx = build.Context({}, str(tmp_path), str(tmp_path / "log.txt"))
    assert not ctx.ships and ctx.source("ldm") == str(shipped("models/toy/ldm.safetensors"))
    assert build.Context({}, str(shipped("models/toy")), "").ships


def test_the_flags_page_is_the_flag_table():
    from ldm.cli.options import flags_markdown

    assert (REPO / "docs/flags.md").read_text().endswith("\n" + flags_markdown())
