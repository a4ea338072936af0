"""FeatInv's model half: the ControlNet with the feature hint block, ControlLDM, the hint
adapters, feature → hint, strict loading of a FeatInv-layout checkpoint, and decoder files."""
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import SD_V1_IGNORABLE_KEYS, CheckpointMismatchError, load_state_dict
from ldm.featinv import (DecoderRecord, feature_to_hint, load_decoder, load_featinv_checkpoint,
                         read_record, save_decoder)
from ldm.featinv.decoder import build_decoder_model
from ldm.models.diffusion.controlled_ddpm import (HintConditioned, HintedDenoiser,
                                                  control_ldm_config)
from ldm.models.loading import build_model
from ldm.util import ConfigError, instantiate_from_config
import featinv_reference as reference
from sd_checkpoint import lightning_checkpoint
from tiny_models import tiny_config, write_tiny_sd

FEATINV_TINY = "configs/tiny/featinv-tiny.yaml"
HINT = (16, 3, 3)   # the hint of configs/tiny/featinv-tiny.yaml: 16 channels (here on a 3x3 grid)
pytestmark = pytest.mark.usefixtures("one_thread")


def randomise(module, seed=0):
    """Random weights everywhere (the zero-initialised convolutions included)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    return module


@pytest.fixture(scope="module")
def featinv_model():
    return randomise(build_model(OmegaConf.load(FEATINV_TINY)))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A folder with the tiny SD-layout base model: tiny.yaml, tiny.ckpt (1000 timesteps)."""
    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), timesteps=1000)


def tiny_record(folder, hidden=24, prompt="a prompt") -> DecoderRecord:
    return DecoderRecord("toy:all", "body.17", True, HINT, str(folder / "tiny.yaml"), hidden,
                         prompt)


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([3, 700])[:batch],
            torch.randn(batch, 5, 32, generator=g), torch.randn(batch, *HINT, generator=g))


# --- A checkpoint of FeatInv's own tree (tests/featinv_reference.py), as its training saves it --

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def featinv_config():
    """configs/tiny/featinv-tiny.yaml with FeatInv's hint width (512, fixed in its code)."""
    config = OmegaConf.load(FEATINV_TINY)
    config.model.params.control_stage_config.params.hint_hidden_channels = reference.HINT_HIDDEN
    return config


def featinv_state(config, seed=3) -> dict[str, torch.Tensor]:
    """The state_dict of FeatInv's ControlLDM of `config`, random: its ControlledUnetModel and
    ControlNet from FeatInv's own module tree; the first stage, the text encoder and the
    schedule's buffers are SD v1's (checked against diffusers in test_equivalence_diffusers),
    plus the `logvar` buffer of its DDPM and the text encoder's `position_ids`."""
    p = config.model.params
    base = build_model(tiny_config(p.timesteps)).state_dict()
    state = {k: v for k, v in base.items() if not k.startswith("model.diffusion_model.")}
    torch.manual_seed(seed)
    for prefix, module in (("model.diffusion_model.", reference.ControlledUnetModel(p.unet_config.params)),
                           ("control_model.", reference.ControlNet(p.control_stage_config.params,
                                                                   p.image_size))):
        state.update({prefix + k: torch.randn(v.shape) for k, v in module.state_dict().items()})
    state["logvar"] = torch.zeros(p.timesteps)
    state[POSITION_IDS] = torch.arange(77)[None]
    return state


def lightning_1x_checkpoint(state: dict) -> dict:
    """What FeatInv's training (PyTorch Lightning 1.x, AdamW over the ControlNet) saves."""
    control = [k for k in state if k.startswith("control_model.")]
    adam = {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(state[k]),
                "exp_avg_sq": torch.zeros_like(state[k])} for i, k in enumerate(control)}
    groups = [{"lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
               "amsgrad": False, "params": list(adam)}]
    return {**lightning_checkpoint(state), "hyper_parameters": {"only_mid_control": False},
            "optimizer_states": [{"state": adam, "param_groups": groups}], "lr_schedulers": []}


def names_and_shapes(state: dict, prefix: str = "") -> list[tuple[str, tuple]]:
    return [(k.removeprefix(prefix), tuple(v.shape)) for k, v in state.items()
            if k.startswith(prefix)]


def test_featinv_tree_has_our_names_shapes_and_order():
    config = featinv_config()
    state, ours = featinv_state(config), build_model(config).state_dict()
    for prefix in ("control_model.", "model.diffusion_model."):
        assert names_and_shapes(state, prefix) == names_and_shapes(ours, prefix)
    assert state["control_model.input_hint_block.block.3.weight"].shape == (512, 512, 3, 3)


def test_featinv_lightning_checkpoint_loads_strictly_and_weights_only(tmp_path):
    config = featinv_config()
    state = featinv_state(config)
    path = tmp_path / "control_featinv_tiny_fin.ckpt"
    torch.save(lightning_1x_checkpoint(state), path)
    model = build_model(config)
    dropped = load_featinv_checkpoint(model, path)   # ldm.checkpoint: torch.load(weights_only)
    assert dropped == sorted(["logvar", POSITION_IDS])
    own = model.state_dict()
    assert own.keys() == state.keys() - set(dropped)
    assert all(torch.equal(own[k], state[k]) for k in own)


def test_featinv_checkpoint_missing_zero_conv_is_an_error(tmp_path):
    config = featinv_config()
    state = featinv_state(config)
    del state["control_model.zero_convs.2.0.bias"]
    torch.save(lightning_1x_checkpoint(state), tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"1 missing.*\n.*\n.*zero_convs\.2\.0\.bias"):
        load_featinv_checkpoint(build_model(config), tmp_path / "broken.ckpt")


def test_control_ldm_config_of_a_base_equals_featinv_config():
    derived = control_ldm_config(tiny_config(1000).model, hint_channels=16, hint_hidden_channels=24)
    model = instantiate_from_config(derived)
    reference = build_model(OmegaConf.load(FEATINV_TINY))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(model) == shapes(reference)
    assert list(model.state_dict()) == list(reference.state_dict())
    with pytest.raises(ConfigError, match="must build ldm.models.diffusion.ddpm.LatentDiffusion"):
        control_ldm_config(derived, 16)


# --- the model ------------------------------------------------------------------------------------

def test_zero_initialised_controlnet_leaves_the_base_model_unchanged():
    base = randomise(build_model(tiny_config(1000)))
    model = instantiate_from_config(control_ldm_config(tiny_config(1000).model, 16, 24))
    model.load_state_dict({**base.state_dict(), **{"control_model." + k: v for k, v in
                                                    model.control_model.state_dict().items()}})
    model.init_control_from_unet()
    z, t, c, hint = inputs()
    expected = base.apply_model(z, t, c)
    assert torch.equal(model.apply_model(z, t, c), expected)
    assert torch.equal(model.apply_model(z, t, c, hint), expected)
    unet, control = model.model.diffusion_model.state_dict(), model.control_model.state_dict()
    assert all(torch.equal(control[k], unet[k]) for k in control
               if k.startswith(("time_embed", "input_blocks", "middle_block.")))
    residuals = model.control_model(z, hint, t, c)
    assert len(residuals) == len(model.model.diffusion_model.input_blocks) + 1
    assert all(not r.any() for r in residuals)


def test_the_hint_steers_every_residual(featinv_model):
    z, t, c, hint = inputs()
    residuals = featinv_model.control_model(z, hint, t, c)
    others = featinv_model.control_model(z, hint + 1, t, c)
    assert all(not torch.allclose(a, b) for a, b in zip(residuals, others, strict=True))
    eps = featinv_model.apply_model(z, t, c, hint)
    assert not torch.allclose(eps, featinv_model.apply_model(z, t, c))   # None: the base alone
    assert not torch.allclose(eps, featinv_model.apply_model(z, t, c, hint + 1))


def test_hint_block_upsamples_to_the_latent_size(featinv_model):
    block = featinv_model.control_model.input_hint_block
    assert [k for k in block.state_dict()] == [f"block.{i}.{p}" for i in (1, 3, 5)
                                               for p in ("weight", "bias")]
    assert block(torch.randn(2, 16, 1, 1), (8, 8)).shape == (2, 32, 8, 8)
    assert block(torch.randn(2, 16, 3, 5), (6, 4)).shape == (2, 32, 6, 4)


def test_only_mid_control_and_dropout_are_refused():
    config = OmegaConf.load(FEATINV_TINY)
    config.model.params.only_mid_control = True
    with pytest.raises(ConfigError, match="only_mid_control"):
        build_model(config)
    config.model.params.only_mid_control = False
    config.model.params.control_stage_config.params.dropout = 0.1
    with pytest.raises(ConfigError, match="dropout"):
        build_model(config)


def test_feature_to_hint():
    pooled = torch.randn(3, 7)
    assert torch.equal(feature_to_hint(pooled), pooled[:, :, None, None])
    spatial = torch.randn(3, 7, 2, 2)
    assert feature_to_hint(spatial) is spatial
    with pytest.raises(ValueError, match="neither a vector"):
        feature_to_hint(torch.randn(3, 4, 7))


# --- the adapters ---------------------------------------------------------------------------------

PROTOCOL = ("betas", "alphas_cumprod", "num_timesteps", "channels", "latent_downsample_factor")


def test_hinted_denoiser_exposes_the_latent_diffusion_protocol(featinv_model):
    z, t, c, hint = inputs()
    bound = HintedDenoiser(featinv_model, hint)
    for name in PROTOCOL:
        assert getattr(bound, name) is getattr(featinv_model, name) or \
            getattr(bound, name) == getattr(featinv_model, name)
    assert torch.equal(bound.apply_model(z, t, c), featinv_model.apply_model(z, t, c, hint))
    eps = bound.apply_model(z, t, c)
    assert torch.equal(bound.predict_start_from_noise(z, t, eps),
                       featinv_model.predict_start_from_noise(z, t, eps))
    assert torch.equal(bound.predict_noise_from_start(z, t, z * 0.5),
                       featinv_model.predict_noise_from_start(z, t, z * 0.5))
    with torch.no_grad():
        assert torch.equal(bound.decode_first_stage(z), featinv_model.decode_first_stage(z))
    one = HintedDenoiser(featinv_model, hint[:1])
    assert torch.equal(one.apply_model(z, t, c),
                       featinv_model.apply_model(z, t, c, hint[:1].expand_as(hint)))
    with pytest.raises(ValueError, match="a hint batch of 2 for a batch of 3"):
        bound.apply_model(torch.cat([z, z[:1]]), torch.cat([t, t[:1]]), torch.cat([c, c[:1]]))


def test_hint_conditioned_takes_the_hint_as_condition(featinv_model):
    z, t, c, hint = inputs()
    adapter = HintConditioned(featinv_model, context=c[:1])
    assert torch.equal(adapter.apply_model(z, t, hint),
                       featinv_model.apply_model(z, t, c[:1].expand_as(c), hint))


# --- decoder files -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, sd_locked", [(torch.float32, True), (torch.float16, True),
                                               (torch.float32, False)])
def test_decoder_file_round_trip(tmp_path, tiny_sd, dtype, sd_locked):
    """The trained tensors come from the file (unlocked: the UNet's decoder half too), every
    other one from the base model."""
    record = dataclasses.replace(tiny_record(tiny_sd), sd_locked=sd_locked)
    model = randomise(build_decoder_model(record, tiny_sd / "tiny.yaml"))
    save_decoder(model, record, tmp_path / "decoder.safetensors", dtype=dtype)
    assert read_record(tmp_path / "decoder.safetensors") == record
    loaded, loaded_record = load_decoder(tmp_path / "decoder.safetensors", tiny_sd / "tiny.ckpt",
                                         tiny_sd / "tiny.yaml")
    assert loaded_record == record
    unet_half = () if sd_locked else ("model.diffusion_model.output_blocks.", "model.diffusion_model.out.")
    trained = {k for k in model.state_dict() if k.startswith(("control_model.", *unet_half))}
    assert load_state_dict(tmp_path / "decoder.safetensors").keys() == trained
    for k in trained:
        assert torch.equal(loaded.state_dict()[k], model.state_dict()[k].to(dtype).float())
    base = torch.load(tiny_sd / "tiny.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in base.items() if k not in trained)


def test_decoder_of_another_hint_width_is_refused(tmp_path, tiny_sd):
    record, wrong = tiny_record(tiny_sd), tiny_record(tiny_sd, hidden=8)
    save_decoder(build_decoder_model(wrong, tiny_sd / "tiny.yaml"), record, tmp_path / "mislabelled.safetensors")
    with pytest.raises(CheckpointMismatchError, match="input_hint_block.block.1.weight"):
        load_decoder(tmp_path / "mislabelled.safetensors", tiny_sd / "tiny.ckpt", tiny_sd / "tiny.yaml")
