"""SD v1 weights as users hold them: a diffusers folder (saved by diffusers' own save_pretrained),
its Hugging Face cache form, and a single-file .safetensors, each loaded through our --ckpt path
and checked equal to diffusers' own models on the same weights; other kinds of folder refused.

The tiny pipeline has the widths of configs/tiny/sd-v1-tiny.yaml, so the single-file test can
load it with that config. diffusers is a test-only dependency: skipped when not installed.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel  # noqa: E402
from test_equivalence_diffusers import PROMPTS, VIT_L14_TEXT, assert_close, randomize_  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from ldm.checkpoint import CheckpointError  # noqa: E402
from ldm.models.diffusers_folder import NotStableDiffusionV1Error  # noqa: E402
from ldm.models import loading  # noqa: E402
from ldm.models.loading import DEFAULT_CONFIG, load_config, load_model  # noqa: E402
from tiny_models import TARGET, TinyExtractor, run_cli  # noqa: E402

TEXT = dict(VIT_L14_TEXT, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=32)


def tiny_pipeline(seed: int = 0) -> dict:
    """diffusers components with the tiny config's widths, random weights everywhere."""
    text_config = CLIPTextConfig(**TEXT)
    text_config._attn_implementation = "eager"
    parts = {
        "unet": UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
            cross_attention_dim=32),
        "vae": AutoencoderKL(
            block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=16,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        "text_encoder": CLIPTextModel(text_config)}
    for i, model in enumerate(parts.values()):
        randomize_(model, seed + i)
        model.eval().requires_grad_(False)
    parts["scheduler"] = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, skip_prk_steps=True)
    return parts


def save_pipeline(parts: dict, folder) -> None:
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    index = {"_class_name": "StableDiffusionPipeline"} | {n: ["diffusers", type(p).__name__]
                                                        for n, p in parts.items()}
    (folder / "model_index.json").write_text(json.dumps(index))


def edit_config(path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.fixture(scope="module")
def reference():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd-v1-diffusers")
    save_pipeline(reference, folder)
    return folder


@pytest.fixture(scope="module")
def ours(folder):
    """Loaded the way --ckpt FOLDER loads it: the default --config is not read."""
    return load_model(DEFAULT_CONFIG, folder).eval()


@torch.no_grad()
def check_equal(model, reference):
    unet, vae, text = reference["unet"], reference["vae"], reference["text_encoder"]
    gen = torch.Generator().manual_seed(1)
    z, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([10, 900])
    assert_close(model.apply_model(z, t, context),
                 unet(z, t, encoder_hidden_states=context).sample, "UNet eps")
    assert_close(model.first_stage_model.decode(z), vae.decode(z).sample, "VAE decode")
    ids = model.cond_stage_model.tokenize(PROMPTS[:3])
    assert_close(model.get_learned_conditioning(PROMPTS[:3]),
                 text(input_ids=ids).last_hidden_state, "text embedding")


def test_folder_matches_diffusers(ours, reference):
    assert ours.num_timesteps == 1000 and ours.scale_factor == pytest.approx(0.18215)
    check_equal(ours, reference)


def test_folder_config_is_the_tiny_config(folder, tiny_config_path):
    """The architecture read from the folder's config files builds the same modules as the YAML
    config written for these widths."""
    from ldm.models.loading import build_model
    ours = build_model(load_config(folder)).state_dict()
    yaml = build_model(load_config(tiny_config_path)).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in yaml.items()}


OLD_ATTENTION_NAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def as_older_snapshot(folder, tmp_path):
    """A copy of `folder` as older snapshots (v1-4's) hold it: the text encoder a pickled
    pytorch_model.bin with transformers 4.x keys (`text_model.*`), the VAE's attention under
    diffusers' old names (query, key, value, proj_attn)."""
    copy = tmp_path / "pipeline"
    shutil.copytree(folder, copy)
    weights = copy / "text_encoder" / "model.safetensors"
    torch.save({f"text_model.{k}": v for k, v in load_file(str(weights)).items()},
               copy / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    vae = copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(vae))
    for new, old in OLD_ATTENTION_NAMES.items():
        state = {k.replace(new, old) if ".mid_block.attentions." in k else k: v for k, v in state.items()}
    assert any(".query." in k for k in state)
    save_file(state, str(vae))
    return copy


def test_hugging_face_cache_snapshot(folder, reference, tmp_path):
    """models--CompVis--stable-diffusion-v1-4/: files in blobs/, the snapshot's entries link to
    them; both the cache folder (refs/main) and the snapshot folder load."""
    folder = as_older_snapshot(folder, tmp_path)
    repo = tmp_path / "hub" / "models--CompVis--stable-diffusion-v1-4"
    snapshot = repo / "snapshots" / "133a221b8aa7292a167afc5127cb63fb5005638b"
    for i, file in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"{i:040x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    check_equal(load_model(DEFAULT_CONFIG, snapshot).eval(), reference)
    assert torch.equal(load_model(DEFAULT_CONFIG, repo).betas, load_model(DEFAULT_CONFIG, snapshot).betas)


@torch.no_grad()
def test_unet_with_sd_v1_block_pattern(tmp_path):
    """SD v1's UNet pattern, smaller: the deepest level without attention (DownBlock2D /
    UpBlock2D, whose upsampler sits at index 1), two resnets per level."""
    parts = tiny_pipeline()
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=2, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)
    randomize_(unet, 5)
    save_pipeline(parts | {"unet": unet.eval()}, tmp_path)
    model = load_model(DEFAULT_CONFIG, tmp_path).eval()
    assert len(model.model.diffusion_model.input_blocks) == 1 + 3 * 2 + 2   # conv_in, resnets, downsamplers
    z, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    t = torch.tensor([500])
    assert_close(model.apply_model(z, t, context), unet(z, t, encoder_hidden_states=context).sample,
                 "UNet eps (SD v1 block pattern)")


def test_single_file_safetensors(ours, reference, tiny_config_path, tmp_path):
    """The same weights as one .safetensors in our (CompVis) layout, with its --config."""
    path = tmp_path / "tiny-v1.safetensors"
    save_file(ours.state_dict(), str(path))
    check_equal(load_model(tiny_config_path, path).eval(), reference)


@pytest.mark.parametrize("component, changes, says", [
    ("unet/config.json", {"cross_attention_dim": 1024}, "Stable Diffusion 2"),
    ("unet/config.json", {"addition_embed_type": "text_time"}, "Stable Diffusion XL"),
    ("scheduler/scheduler_config.json", {"prediction_type": "v_prediction"}, "v_prediction model"),
    ("unet/config.json", {"in_channels": 9}, "inpainting"),
    ("scheduler/scheduler_config.json", {"beta_schedule": "linear"}, "scheduler_config.json has"),
])
def test_other_kinds_refused(folder, tmp_path, component, changes, says):
    wrong = tmp_path / "pipeline"
    shutil.copytree(folder, wrong)
    edit_config(wrong / component, **changes)
    with pytest.raises(NotStableDiffusionV1Error, match=says) as err:
        load_model(DEFAULT_CONFIG, wrong)
    assert "Stable Diffusion v1" in str(err.value) and "\n" not in str(err.value)


def test_folder_of_something_else_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers Stable Diffusion pipeline"):
        load_model(DEFAULT_CONFIG, tmp_path / "weights")


def folder_args(folder, out) -> list:
    """A short guided run of the tiny pipeline: --ckpt FOLDER and no --config."""
    return ["--ckpt", folder, "--H", "16", "--W", "16", "--device", "cpu", "--no_progress",
            "--prompt", TARGET, "--optim_folder", out, "--optim_forward_guidance", "--optim_timesteps", "2"]


def test_command_line_runs_from_the_folder(folder, tmp_path, capsys):
    code, _, err = run_cli(TinyExtractor, folder_args(folder, tmp_path / "out"), capsys)
    assert code == 0, err
    assert list((tmp_path / "out").rglob("*.png"))


def test_command_line_refuses_another_kind_before_building(folder, tmp_path, capsys, monkeypatch):
    wrong = tmp_path / "sd2"
    shutil.copytree(folder, wrong)
    edit_config(wrong / "unet" / "config.json", cross_attention_dim=1024)
    monkeypatch.setattr(loading, "build_model", lambda *a: pytest.fail("a model was built"))
    code, _, err = run_cli(TinyExtractor, folder_args(wrong, tmp_path / "out"), capsys)
    assert code == 2 and err.startswith("error: ") and "holds Stable Diffusion 2" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_featinv_decoder_on_a_folder_base(folder, ours, tmp_path):
    """train_featinv.py --base FOLDER --ckpt FOLDER: the decoder built on the folder's model
    (its ControlNet copied from the folder's UNet), saved, and loaded again with --ckpt FOLDER
    (the default --config, as the command line passes it, is not read)."""
    from ldm.featinv.decoder import DecoderRecord, load_decoder, new_decoder, save_decoder
    record = DecoderRecord("toy:all", "body.17", True, (8, 4, 4), str(folder), 24, "a prompt")
    model = new_decoder(record, folder, folder)
    base = ours.state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
    unet = {k.removeprefix("model.diffusion_model."): v for k, v in base.items()
            if k.startswith("model.diffusion_model.input_blocks.")}
    assert all(torch.equal(model.control_model.state_dict()[k], v) for k, v in unet.items())
    save_decoder(model, record, tmp_path / "decoder.safetensors")
    loaded, _ = load_decoder(tmp_path / "decoder.safetensors", folder, base_config=DEFAULT_CONFIG)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
