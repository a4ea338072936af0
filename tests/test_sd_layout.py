"""Proof that the model built from configs/stable-diffusion/v1-inference.yaml IS Stable Diffusion v1.

* The full model is built on the ``meta`` device (shapes only, no memory, ~2 s) and checked
  against the numbers and key names of the SD v1 checkpoint layout (sd-v1-4.ckpt).
* Independently, diffusers' single-file converters (ldm -> diffusers, test-only dependency)
  must map every one of our keys onto diffusers' / transformers' own SD v1 modules.
* Loading: key check, missing file, foreign architecture, Lightning ``.ckpt`` and
  ``.safetensors`` round trips, run on the tiny config (same classes, small widths).
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoint import (SD_V1_IGNORABLE_KEYS, CheckpointError, CheckpointMismatchError,
                            CheckpointNotFoundError, check_state_dict, load_into)
from ldm.models import loading
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.loading import build_model, load_config, load_model
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.util import instantiate_from_config
from sd_checkpoint import lightning_checkpoint

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
UNET_PARAMS, VAE_PARAMS, TEXT_PARAMS = 859_520_964, 83_653_863, 123_060_480
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2")

# Key names and shapes as stored in sd-v1-4.ckpt.
SD_V1_KEYS = {
    # UNet: conv in/out, time embedding, ResBlocks with and without 1x1 skip, down/up-samplers
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.time_embed.2.weight": (1280, 1280),
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": (320,),
    "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "model.diffusion_model.input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.9.0.op.bias": (1280,),
    "model.diffusion_model.input_blocks.11.0.out_layers.3.bias": (1280,),
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.0.in_layers.0.weight": (640,),
    "model.diffusion_model.out.0.weight": (320,),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    # UNet: spatial transformers (conv proj_in/proj_out, 8 heads, GEGLU, context 768)
    "model.diffusion_model.input_blocks.1.1.norm.weight": (320,),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.1.1.proj_out.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 768),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn1.to_q.weight": (1280, 1280),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0.bias": (1280,),
    "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm3.weight": (320,),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight": (320, 768),
    # first stage (KL-f8 autoencoder)
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.mid.attn_1.proj_out.bias": (512,),
    "first_stage_model.encoder.norm_out.weight": (512,),
    "first_stage_model.encoder.conv_out.weight": (8, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3),
    "first_stage_model.decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    # text encoder (CLIP ViT-L/14 text tower, transformers 4.x key layout)
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.out_proj.bias": (768,),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.layer_norm2.bias": (768,),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}
# Keys that SD v1 does not have (no attention at the lowest resolution, no class labels, no
# CLIP projection, no first-stage loss, no EMA copy, no learned logvar).
NOT_SD_V1_KEYS = (
    "model.diffusion_model.input_blocks.10.1.norm.weight",
    "model.diffusion_model.output_blocks.0.1.norm.weight",
    "model.diffusion_model.label_emb.0.0.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.12.mlp.fc1.weight",
    "cond_stage_model.transformer.text_projection.weight",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "model_ema.decay", "logvar", "scale_factor",
)
# OpenAI CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14 text_config), written out here.
VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5)


def part(sd: dict, prefix: str) -> dict:
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def sd_config(sd_v1_config_path):
    return load_config(sd_v1_config_path)


@pytest.fixture(scope="module")
def meta_model(sd_config):
    with torch.device("meta"):
        model = build_model(sd_config)
    return model


@pytest.fixture(scope="module")
def meta_sd(meta_model):
    return meta_model.state_dict()


@pytest.fixture
def tiny_model(tiny_config_path):
    torch.manual_seed(0)
    model = build_model(load_config(tiny_config_path))
    with torch.no_grad():  # no zero-initialised convs: every weight affects the outputs
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


# --- the layout -----------------------------------------------------------------------------

def test_sd_v1_parameter_counts(meta_model, meta_sd):
    assert isinstance(meta_model, LatentDiffusion)
    assert isinstance(meta_model.cond_stage_model, FrozenCLIPEmbedder)
    counts = {name: (sum(p.numel() for p in m.parameters()), len(list(m.parameters())))
              for name, m in [("unet", meta_model.model.diffusion_model),
                              ("vae", meta_model.first_stage_model),
                              ("text", meta_model.cond_stage_model)]}
    assert counts == {"unet": (UNET_PARAMS, 686), "vae": (VAE_PARAMS, 248),
                      "text": (TEXT_PARAMS, 196)}
    assert sum(p.numel() for p in meta_model.parameters()) == UNET_PARAMS + VAE_PARAMS + TEXT_PARAMS
    # the state_dict holds exactly the parameters and the 12 schedule buffers
    assert (len(part(meta_sd, UNET)), len(part(meta_sd, VAE)), len(part(meta_sd, TEXT))) == (
        686, 248, 196)
    assert len(meta_sd) == 686 + 248 + 196 + len(SCHEDULE_BUFFERS)


def test_sd_v1_schedule_buffers(meta_model, meta_sd):
    top_level = [k for k in meta_sd if "." not in k]
    assert sorted(top_level) == sorted(SCHEDULE_BUFFERS)
    for name in SCHEDULE_BUFFERS:
        assert meta_sd[name].shape == (1000,) and meta_sd[name].dtype == torch.float32, name
    assert meta_model.num_timesteps == 1000
    assert meta_model.scale_factor == pytest.approx(0.18215)
    assert meta_model.latent_downsample_factor == 8


@pytest.mark.parametrize("key", list(SD_V1_KEYS))
def test_sd_v1_key_shapes(meta_sd, key):
    assert key in meta_sd
    assert tuple(meta_sd[key].shape) == SD_V1_KEYS[key]


def test_keys_sd_v1_does_not_have(meta_sd):
    assert not [k for k in NOT_SD_V1_KEYS if k in meta_sd]
    assert not [k for k in meta_sd
                if "model_ema" in k or (k.startswith("model.") and not k.startswith(UNET))]


def test_sd_v1_head_layout(meta_model):
    """8 heads everywhere, head dim = channels // 8 (40, 80, 160), cross-attention from 768."""
    attn = {n: m for n, m in meta_model.model.diffusion_model.named_modules()
            if n.endswith(("attn1", "attn2"))}
    assert len(attn) == 2 * 16  # 16 spatial transformers, one block each
    assert {m.heads for m in attn.values()} == {8}
    assert {m.to_q.out_features // m.heads for m in attn.values()} == {40, 80, 160}
    assert {m.to_k.in_features for n, m in attn.items() if n.endswith("attn2")} == {768}


# --- independent cross-check with diffusers' ldm -> diffusers converters ----------------------

def origin(t: torch.Tensor) -> int:
    """id of the tensor a converted value came from (converters may slice 1x1 convs)."""
    return id(t._base if t._base is not None else t)


def assert_same_layout(converted: dict, ours: dict, reference: dict, what: str):
    # every one of our tensors is used exactly once ...
    assert len(converted) == len(ours), what
    assert sorted(map(origin, converted.values())) == sorted(map(id, ours.values())), what
    # ... and lands on exactly the reference module's keys, with its shapes
    assert set(converted) == set(reference), (what, sorted(set(converted) ^ set(reference))[:10])
    wrong = [(k, tuple(v.shape), tuple(reference[k].shape)) for k, v in converted.items()
             if v.shape != reference[k].shape]
    assert not wrong, (what, wrong[:10])


@pytest.fixture(scope="module")
def single_file_utils():
    pytest.importorskip("diffusers")
    from diffusers.loaders import single_file_utils
    return single_file_utils


def test_unet_maps_onto_diffusers_unet(sd_config, meta_sd, single_file_utils):
    from diffusers import UNet2DConditionModel
    original = OmegaConf.to_container(sd_config, resolve=True)
    assert single_file_utils.infer_diffusers_model_type(meta_sd) == "v1"
    config = single_file_utils.create_unet_diffusers_config_from_ldm(original, meta_sd)
    assert config["block_out_channels"] == [320, 640, 1280, 1280]
    assert config["cross_attention_dim"] == 768 and config["attention_head_dim"] == 8
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert config["use_linear_projection"] is False
    converted = single_file_utils.convert_ldm_unet_checkpoint(meta_sd, config)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    assert sum(p.numel() for p in unet.parameters()) == UNET_PARAMS
    assert_same_layout(converted, part(meta_sd, UNET), unet.state_dict(), "unet")


def test_vae_maps_onto_diffusers_autoencoder(sd_config, meta_sd, single_file_utils):
    from diffusers import AutoencoderKL
    original = OmegaConf.to_container(sd_config, resolve=True)
    config = single_file_utils.create_vae_diffusers_config_from_ldm(original, meta_sd)
    assert config["block_out_channels"] == [128, 256, 512, 512]
    assert config["latent_channels"] == 4 and config["scaling_factor"] == pytest.approx(0.18215)
    converted = single_file_utils.convert_ldm_vae_checkpoint(meta_sd, config)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    assert sum(p.numel() for p in vae.parameters()) == VAE_PARAMS
    assert_same_layout(converted, part(meta_sd, VAE), vae.state_dict(), "vae")


def test_text_encoder_maps_onto_transformers_clip(meta_sd, single_file_utils):
    from transformers import CLIPTextConfig, CLIPTextModel
    converted = single_file_utils.convert_ldm_clip_checkpoint(meta_sd)
    # The converter leaves transformers 4.x keys ("text_model.*"); transformers 5.x's
    # CLIPTextModel holds the layers directly (its from_pretrained drops that prefix).
    assert converted and all(k.startswith("text_model.") for k in converted)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**VIT_L14_TEXT))
    reference = clip.state_dict()
    if any(k.startswith("text_model.") for k in reference):  # transformers 4.x
        reference = {k.removeprefix("text_model."): v for k, v in reference.items()}
    assert sum(p.numel() for p in clip.parameters()) == TEXT_PARAMS
    assert_same_layout(converted, part(meta_sd, TEXT), reference, "text encoder")


# --- key check ------------------------------------------------------------------------------

def sd_v1_extras():
    """What sd-v1-4.ckpt carries besides the model's own keys."""
    return {"model_ema.decay": torch.tensor(0.9999),
            "model_ema.num_updates": torch.tensor(470000, dtype=torch.int32),
            "cond_stage_model.transformer.text_model.embeddings.position_ids":
                torch.arange(77).unsqueeze(0)}


def test_ignorable_keys_are_exactly_the_sd_v1_extras():
    assert sorted(SD_V1_IGNORABLE_KEYS) == sorted(sd_v1_extras())


def test_full_size_key_check_drops_only_the_harmless_extras(meta_model, meta_sd):
    kept, dropped = check_state_dict(meta_model, {**meta_sd, **sd_v1_extras()})
    assert dropped == sorted(sd_v1_extras())
    assert kept.keys() == meta_sd.keys()
    unknown = "model.diffusion_model.input_blocks.1.1.transformer_blocks.1.attn1.to_q.weight"
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected") as err:
        check_state_dict(meta_model, {**meta_sd, **sd_v1_extras(),
                                      unknown: torch.empty(320, 320, device="meta")})
    assert unknown in str(err.value)


def test_load_into_drops_extras_and_loads_every_weight(tiny_model, tiny_config_path):
    sd = tiny_model.state_dict()
    target = build_model(load_config(tiny_config_path))
    dropped = load_into(target, {**sd, **sd_v1_extras()})
    assert dropped == sorted(sd_v1_extras())
    for key, value in target.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_load_into_names_unknown_missing_and_misshapen_keys(tiny_model, tiny_config_path):
    sd = {**tiny_model.state_dict(), **sd_v1_extras()}
    target = build_model(load_config(tiny_config_path))
    unknown = "model.diffusion_model.label_emb.0.0.weight"
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(target, {**sd, unknown: torch.zeros(128, 32)})
    msg = str(err.value)
    assert "1 unexpected" in msg and f"{unknown} (128, 32)" in msg
    assert "model_ema" not in msg and "position_ids" not in msg  # extras are not reported

    gone = "first_stage_model.quant_conv.bias"
    with pytest.raises(CheckpointMismatchError, match="1 missing") as err:
        load_into(target, {k: v for k, v in sd.items() if k != gone})
    assert gone in str(err.value)

    bad = "model.diffusion_model.time_embed.0.weight"
    with pytest.raises(CheckpointMismatchError, match="1 wrong-shape") as err:
        load_into(target, {**sd, bad: torch.zeros(128, 64)})
    assert f"{bad}: file (128, 64) vs model (128, 32)" in str(err.value)


# --- load_model -----------------------------------------------------------------------------

def test_missing_checkpoint_fails_fast_with_download_hint(sd_v1_config_path, tmp_path,
                                                           monkeypatch):
    def no_build(config):
        raise AssertionError("the model must not be built when the checkpoint is missing")

    monkeypatch.setattr(loading, "build_model", no_build)
    path = tmp_path / "weights" / "my-sd.ckpt"
    with pytest.raises(CheckpointNotFoundError) as err:
        load_model(sd_v1_config_path, path)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, CheckpointError)
    msg = str(err.value)
    assert str(path) in msg
    assert "https://huggingface.co/CompVis/stable-diffusion-v-1-4-original" in msg
    assert "models/ldm/stable-diffusion/sd-v1-4.ckpt" in msg
    # the default names the installation's copy, wherever the script runs from
    assert loading.DEFAULT_CKPT == str(Path(__file__).resolve().parents[1] / "models/ldm/stable-diffusion/sd-v1-4.ckpt")


def test_checkpoint_of_another_architecture_is_refused(tiny_config_path, meta_model, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.ckpt"
    torch.save({"state_dict": resnet, "epoch": 3}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_model(tiny_config_path, path)
    msg = str(err.value)
    assert "does not look like a checkpoint" in msg
    assert f"{len(resnet)} unexpected" in msg and "conv1.weight (64, 3, 7, 7)" in msg
    assert "model.diffusion_model.input_blocks.0.0.weight" in msg  # reported missing
    # the same verdict at full SD v1 size (shapes only)
    with pytest.raises(CheckpointMismatchError, match=f"1142 missing, {len(resnet)} unexpected"
                       ) as err:
        check_state_dict(meta_model, resnet)
    assert "conv1.weight (64, 3, 7, 7)" in str(err.value)
    assert "model.diffusion_model.input_blocks.0.0.weight (320, 4, 3, 3)" in str(err.value)


def test_weights_for_other_widths_are_refused(tiny_model, tiny_config_path, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_model.state_dict(), path)
    config = OmegaConf.load(tiny_config_path)
    config.model.params.unet_config.params.model_channels = 64
    wide = tmp_path / "wide.yaml"
    OmegaConf.save(config, wide)
    with pytest.raises(CheckpointMismatchError, match="wrong-shape") as err:
        load_model(wide, path)
    assert ("model.diffusion_model.input_blocks.0.0.weight: file (32, 4, 3, 3) vs model "
            "(64, 4, 3, 3)") in str(err.value)






@torch.no_grad()
def outputs(model: LatentDiffusion) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(2, 4, 8, 8, generator=gen)
    x = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
    cond = model.get_learned_conditioning(["a painting of a fox", ""])
    return [cond, model.apply_model(z, torch.tensor([1, 999]), cond),
            model.decode_first_stage(z), model.encode_first_stage(x).mean]


@pytest.mark.parametrize("fmt", ["lightning.ckpt", "safetensors"])
def test_saved_tiny_model_loads_with_identical_outputs(tiny_model, tiny_config_path, tmp_path,
                                                       fmt):
    state_dict = tiny_model.state_dict()
    path = tmp_path / f"tiny.{fmt.split('.')[-1]}"
    if fmt == "safetensors":
        save_file(state_dict, path)
    else:
        torch.save(lightning_checkpoint({**state_dict, **sd_v1_extras()}), path)
    loaded = load_model(tiny_config_path, path)
    assert isinstance(loaded, LatentDiffusion) and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    assert loaded.state_dict().keys() == state_dict.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state_dict[key]), key
    for ours, theirs in zip(outputs(loaded), outputs(tiny_model)):
        assert torch.equal(ours, theirs)


# --- frozen inference model ------------------------------------------------------------------

def test_every_parameter_is_frozen(tiny_config_path, meta_model):
    model = build_model(load_config(tiny_config_path))
    for m in (model, meta_model):
        assert not [n for n, p in m.named_parameters() if p.requires_grad]
        assert not [n for n, m_ in m.named_modules() if m_.training]


def test_train_keeps_eval_mode(tiny_config_path):
    model = build_model(load_config(tiny_config_path))
    assert model.train() is model
    assert not [n for n, m in model.named_modules() if m.training]
    model.train(True)
    model.cond_stage_model.train()
    assert not [n for n, m in model.named_modules() if m.training]
    assert not [n for n, p in model.named_parameters() if p.requires_grad]


def test_instantiate_from_config_builds_the_same_model(tiny_config_path):
    config = load_config(tiny_config_path)
    torch.manual_seed(0)
    a = build_model(config)
    torch.manual_seed(0)
    b = instantiate_from_config(config.model)
    assert type(a) is type(b) is LatentDiffusion
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_empty_prompt_tokens(tiny_model):
    cond_stage = tiny_model.cond_stage_model
    expected = torch.tensor([[49406] + [49407] * 76])
    assert torch.equal(cond_stage.tokenize([""]), expected)
    assert torch.equal(cond_stage.tokenize(""), expected)
    ids = cond_stage.tokenizer([""], padding="max_length", max_length=77,
                               truncation=True)["input_ids"]
    assert ids == expected.tolist()
