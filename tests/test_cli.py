"""Each per-model script end to end through its command line, with tiny stand-in weights:
a tiny SD-v1-shaped model (20 timesteps) and random-weight target models. A script is one call
`main(...)`; its arguments are read from the script's source (never by loading the file) and
the command line runs with them in this process."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.extractors import ClipRN50Extractor, ResNet50Extractor, VitH14Extractor
from ldm.scorelog import read_scores
from tiny_models import REPO, run_cli, tiny_config, tiny_model

T = 20
SCRIPTS = REPO / "scripts"


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    OmegaConf.save(tiny_config(T), folder / "tiny.yaml")
    # A Lightning-shaped checkpoint with SD v1's harmless extras.
    state_dict = dict(tiny_model(T).state_dict())
    state_dict["model_ema.decay"] = torch.tensor(0.9999)
    state_dict["model_ema.num_updates"] = torch.tensor(0)
    torch.save({"state_dict": state_dict, "global_step": 470000}, folder / "tiny.ckpt")
    return folder / "tiny.yaml", folder / "tiny.ckpt"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random-weight files in each library's layout."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    save_file(ResNet50Extractor.architecture().state_dict(), str(folder / "resnet50.safetensors"))
    save_file(ClipRN50Extractor.architecture().state_dict(), str(folder / "rn50.safetensors"))
    return folder


def script_call(script: str) -> tuple[list, dict]:
    """The literal arguments of the `main(...)` call of scripts/<script>."""
    tree = ast.parse((SCRIPTS / script).read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "main")
    return ([ast.literal_eval(a) for a in call.args],
            {k.arg: ast.literal_eval(k.value) for k in call.keywords})


def run_script(script, args, capsys):
    """What `python scripts/<script> args` does, in this process; → (code, out, err)."""
    positional, keywords = script_call(script)
    return run_cli(*positional, args, capsys, **keywords)


@pytest.mark.parametrize("script, extractor", [
    ("resnet50_guided.py", "torchvision:resnet50"), ("vith14_guided.py", "torchvision:vit_h_14"),
    ("clip_guided.py", "open_clip:RN50"), ("clip_guided2.py", "open_clip:RN50"),
    ("feature_guided.py", None)])
def test_each_script_is_one_call_of_the_shared_command_line(script, extractor):
    positional, _ = script_call(script)
    assert positional == [extractor]


def test_a_script_runs_as_a_program():
    done = subprocess.run([sys.executable, str(SCRIPTS / "resnet50_guided.py"), "--help"],
                          capture_output=True, text=True, cwd="/")
    assert done.returncode == 0 and "--optim_forward_guidance_wt" in done.stdout


def common(sd_files, folder, *extra):
    config, ckpt = sd_files
    return ["--config", config, "--ckpt", ckpt, "--H", 16, "--W", 16, "--device", "cpu",
            "--optim_folder", folder, "--no_progress", "--optim_forward_guidance",
            "--optim_forward_guidance_wt", 4, "--optim_grad_clip_threshold", 3.0,
            "--optim_num_steps", 2, 1, "--optim_early_emp_end", T - 2, *extra]


def check_outputs(folder: Path, with_cosine: bool, printed: bool = True):
    files = {p.name for p in folder.iterdir()}
    assert {"log.txt", "out_img.png", "metrics.json"} <= files
    best = [f for f in files if f.startswith("out_img_best_t_")]
    assert len(best) == 1 and re.fullmatch(r"out_img_best_t_\d+_rec_\d+(\.5)?_bk_-1_sim_-\d+\.\d{6}\.png", best[0])
    if printed:  # every 10 timesteps (and the first one for the pre-guidance image)
        assert {f"original_guidance_{i}_0.png" for i in (19, 10, 0)} <= files
        assert {f"guidance_3_{i}_0.png" for i in (10, 0)} <= files
        assert "guidance_3_19_0.png" not in files
    lines = (folder / "log.txt").read_text().splitlines()
    scores = read_scores(folder / "log.txt")
    scored = [r for r in scores if r.stage != "final"]
    assert len(scored) == 2 * (2 * 2 + (T - 2) * 1)       # before and after guidance
    assert all((r.cosine is not None) == with_cosine for r in scores)
    final = [r for r in scores if r.stage == "final"]
    assert len(final) == 1
    assert re.match(r"Elapsed time = [\d.]+ sec", lines[-2]) and lines[-1].startswith("Run options: Namespace(")

    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["finished"] is True and metrics["iterations"] == 2 * 2 + (T - 2)
    assert metrics["best"]["file"] == best[0]
    assert metrics["best"]["squared_distance"] <= metrics["final"]["squared_distance"] + 1e-5
    assert metrics["final"]["squared_distance"] == pytest.approx(final[0].distance)
    for key in ("final", "best"):
        assert -1 <= metrics[key]["cosine"] <= 1
        assert set(metrics[key]["reloaded_png"]) == {"squared_distance", "cosine"}
    assert metrics["seed"] == 42 and metrics["versions"]["torch"] == torch.__version__
    return metrics


@pytest.mark.slow
def test_resnet50_script(sd_files, weights, tmp_path, capsys):
    folder = tmp_path / "nested" / "out"        # parents are created
    code, out, err = run_script("resnet50_guided.py", common(
        sd_files, folder, "--optim_print", "--prompt", REPO / "data/examples/chelsea.jpg",
        "--extractor_weights", weights / "resnet50.safetensors"), capsys)
    assert code == 0, err
    metrics = check_outputs(folder, with_cosine=True)
    assert metrics["extractor"] == "torchvision:resnet50" and metrics["feature_shape"] == [2048]
    assert "final: squared distance" in out


@pytest.mark.slow
def test_clip_scripts_image_and_text(sd_files, weights, tmp_path, capsys):
    clip_weights = ["--extractor_weights", weights / "rn50.safetensors"]
    code, _, err = run_script("clip_guided.py", common(
        sd_files, tmp_path / "img", "--prompt", REPO / "data/examples/coffee.jpg", *clip_weights), capsys)
    assert code == 0, err
    check_outputs(tmp_path / "img", with_cosine=True, printed=False)

    code, _, err = run_script("clip_guided.py", common(
        sd_files, tmp_path / "txt", "--prompt", "a red car", *clip_weights), capsys)
    assert code == 0, err
    metrics = check_outputs(tmp_path / "txt", with_cosine=True, printed=False)
    assert (metrics["target"]["kind"], metrics["target"]["source"]) == ("text", "a red car")

    # clip_guided2.py reads --prompt as text even when it names an existing file.
    code, _, err = run_script("clip_guided2.py", common(
        sd_files, tmp_path / "txt2", "--prompt", "data/examples/coffee.jpg", *clip_weights), capsys)
    assert code == 0, err
    metrics = check_outputs(tmp_path / "txt2", with_cosine=True, printed=False)
    assert metrics["target"]["kind"] == "text" and metrics["feature_shape"] == [1024]


def test_vith14_script_with_a_small_vit(sd_files, tmp_path, capsys, monkeypatch):
    from torchvision.models.vision_transformer import VisionTransformer

    def small_vit():
        return VisionTransformer(image_size=518, patch_size=14, num_layers=1, num_heads=2,
                                 hidden_dim=32, mlp_dim=64)

    monkeypatch.setattr(VitH14Extractor, "architecture", classmethod(lambda cls: small_vit()))
    torch.save(small_vit().state_dict(), tmp_path / "vit.pth")
    code, _, err = run_script("vith14_guided.py", common(
        sd_files, tmp_path / "out", "--prompt", REPO / "data/examples/astronaut.jpg",
        "--extractor_weights", tmp_path / "vit.pth"), capsys)
    assert code == 0, err
    assert check_outputs(tmp_path / "out", with_cosine=True, printed=False)["extractor"] == "torchvision:vit_h_14"


def code_of_page(page: str) -> str:
    return re.search(r"```python\n(# scripts/convnext_guided.py\n.*?)```", page, re.S).group(1)


@pytest.mark.slow
def test_readme_example_adds_a_model(sd_files, tmp_path, capsys):
    """docs/adding-a-model.md's script, copied verbatim, runs with every flag."""
    from torchvision.models import convnext_tiny

    readme = (REPO / "docs" / "adding-a-model.md").read_text()
    code = code_of_page(readme)
    namespace = {"__name__": "convnext_guided"}        # the script, not run as __main__
    exec(compile(code, "convnext_guided.py", "exec"), namespace)
    assert "sys.exit(main(ConvNeXtTiny))" in code
    torch.save(convnext_tiny().state_dict(), tmp_path / "convnext.pth")
    code, _, err = run_cli(namespace["ConvNeXtTiny"], common(
        sd_files, tmp_path / "out", "--prompt", REPO / "data/examples/rocket.jpg",
        "--extractor_weights", tmp_path / "convnext.pth"), capsys)
    assert code == 0, err
    metrics = check_outputs(tmp_path / "out", with_cosine=True, printed=False)
    assert metrics["extractor"] == "convnext_tiny" and metrics["feature_shape"] == [768]
    # As a registry name: random weights, a layer's spatial map, named by its file.
    (tmp_path / "convnext_guided.py").write_text(code_text := code_of_page(readme))
    code, _, err = run_cli(None, [*common(sd_files, tmp_path / "layer", "--prompt", REPO / "data/examples/rocket.jpg",
                                          "--extractor_weights", "random"),
                                  "--extractor", f"{tmp_path / 'convnext_guided.py'}:ConvNeXtTiny",
                                  "--layer", "features.5", "--spatial"], capsys)
    assert code == 0, err
    metrics = check_outputs(tmp_path / "layer", with_cosine=True, printed=False)
    assert metrics["extractor"] == "convnext_tiny@features.5" and metrics["feature_shape"] == [384, 14, 14]
    assert "register_extractor" in code_text
    code, _, err = run_cli(None, [*common(sd_files, tmp_path / "bad", "--prompt", REPO / "data/examples/rocket.jpg",
                                          "--extractor_weights", "random"),
                                  "--extractor", "convnext_tiny", "--layer", "stages.9"], capsys)
    assert code == 2 and "valid names near 'stages.9'" in err, err


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a photo of a dog"], "supports image targets only"),
    (["--prompt", "data/missing_image.PNG"], "looks like an image path, but no such file exists"),
    (["--prompt", "README.md"], "is not a readable image"),
    (["--H", "18"], "--H 18 must be a multiple of 4"),
    (["--optim_num_steps", "0"], "--optim_num_steps: must be an integer from 1"),
    (["--optim_early_emp_end", "1001"], "--optim_early_emp_end: 1001 is past the model's last timestep"),
    (["--device", "cuda:7"], "--device 'cuda:7' is not available"),
    (["--ckpt", "models/nowhere.ckpt"], "models/ldm/stable-diffusion/sd-v1-4.ckpt"),
])
def test_bad_input_gets_a_clear_error(sd_files, weights, tmp_path, capsys, args, message):
    code, _, err = run_script("resnet50_guided.py", [
        *common(sd_files, tmp_path / "out", "--prompt", REPO / "data/examples/chelsea.jpg",
                "--extractor_weights", weights / "resnet50.safetensors"), *args], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_finished_run_is_not_overwritten(sd_files, weights, tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    args = common(sd_files, folder, "--prompt", REPO / "data/examples/chelsea.jpg",
                  "--extractor_weights", weights / "resnet50.safetensors", "--optim_num_steps", 1)
    code, _, err = run_script("resnet50_guided.py", args, capsys)
    assert code == 2 and "already holds a finished run" in err
    assert (folder / "metrics.json").read_text() == "{}"
    code, _, err = run_script("resnet50_guided.py", [*args, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((folder / "metrics.json").read_text())["finished"] is True


# --- any model, any layer: scripts/feature_guided.py -------------------------------------------
def test_timm_model_through_the_registry(sd_files, tmp_path, capsys):
    code, out, err = run_script("feature_guided.py", common(
        sd_files, tmp_path / "timm", "--extractor", "timm:test_resnet", "--extractor_weights", "random",
        "--prompt", REPO / "data/examples/coffee.jpg"), capsys)
    assert code == 0, err
    metrics = check_outputs(tmp_path / "timm", with_cosine=True, printed=False)
    assert metrics["extractor"] == "timm:test_resnet" and len(metrics["feature_shape"]) == 1


@pytest.mark.slow
def test_torchvision_intermediate_layer_pooled_and_spatial(sd_files, weights, tmp_path, capsys):
    resnet = ["--extractor_weights", weights / "resnet50.safetensors", "--prompt", REPO / "data/examples/chelsea.jpg"]
    code, _, err = run_script("resnet50_guided.py", common(sd_files, tmp_path / "pooled", *resnet,
                                                          "--layer", "layer3"), capsys)
    assert code == 0, err
    metrics = check_outputs(tmp_path / "pooled", with_cosine=True, printed=False)
    assert metrics["extractor"].endswith("@layer3") and metrics["feature_shape"] == [1024]
    code, _, err = run_script("feature_guided.py", common(
        sd_files, tmp_path / "spatial", "--extractor", "torchvision:resnet18@layer2", "--spatial",
        "--extractor_weights", "random", "--channels", "0:32", "--prompt", REPO / "data/examples/chelsea.jpg"),
        capsys)
    assert code == 0, err
    metrics = check_outputs(tmp_path / "spatial", with_cosine=True, printed=False)
    assert metrics["feature_shape"] == [128, 28, 28] and metrics["objective"]["spatial"] is True


@pytest.mark.parametrize("extractor, message", [
    ("torchvision:resnet18@layer5", "layer1, layer2, layer3, layer4"),
    ("torchvision:resnet18@layer3.9", "layer3.0, layer3.1"),
    ("nolib:resnet18", "torchvision"),
    ("torchvision:resnet_18", "resnet18"),
])
def test_registry_errors_name_the_valid_choices(sd_files, tmp_path, capsys, extractor, message):
    code, _, err = run_script("feature_guided.py", common(
        sd_files, tmp_path / "out", "--extractor", extractor, "--extractor_weights", "random"), capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, err
