"""FeatInv's model half: the ControlNet with the feature hint block, ControlLDM, the hint
adapters, feature → hint, strict loading of a FeatInv-layout checkpoint, and decoder files."""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import SD_V1_IGNORABLE_KEYS, CheckpointMismatchError
from ldm.featinv import (DecoderRecord, feature_to_hint, load_decoder, load_featinv_checkpoint,
                         read_record, save_decoder)
from ldm.featinv.decoder import build_decoder_model
from ldm.models.diffusion.controlled_ddpm import (HintConditioned, HintedDenoiser,
                                                  control_ldm_config)
from ldm.models.loading import build_model
from ldm.util import ConfigError, instantiate_from_config
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


# --- FeatInv's layout, written from its config and cldm code -----------------------------------

def featinv_layout(config, base_state: dict) -> dict[str, tuple]:
    """Key → shape of a ControlLDM state dict as FeatInv's code builds it (cldm.ControlNet with
    FeatInvInputHintBlock, CompVis ControlNet's DDPM). The copied parts have the UNet's keys
    (FeatInv's tool_add_control copies control_model.X from model.diffusion_model.X)."""
    p = config.model.params.control_stage_config.params
    layout = {k: tuple(v.shape) for k, v in base_state.items()}
    layout["logvar"] = (config.model.params.timesteps,)              # a buffer of their DDPM
    layout["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    for k, v in base_state.items():
        part = k.removeprefix("model.diffusion_model.")
        if part.split(".")[0] in ("time_embed", "input_blocks", "middle_block"):
            layout["control_model." + part] = tuple(v.shape)
    widths = [p.model_channels]                                       # input block outputs
    for level, mult in enumerate(p.channel_mult):
        widths += [mult * p.model_channels] * p.num_res_blocks
        if level != len(p.channel_mult) - 1:
            widths.append(mult * p.model_channels)
    for n, ch in enumerate(widths):
        layout[f"control_model.zero_convs.{n}.0.weight"] = (ch, ch, 1, 1)
        layout[f"control_model.zero_convs.{n}.0.bias"] = (ch,)
    layout["control_model.middle_block_out.0.weight"] = (widths[-1], widths[-1], 1, 1)
    layout["control_model.middle_block_out.0.bias"] = (widths[-1],)
    hidden = p.hint_hidden_channels
    for index, shape in ((1, (hidden, p.hint_channels)), (3, (hidden, hidden)),
                         (5, (p.model_channels, hidden))):
        layout[f"control_model.input_hint_block.block.{index}.weight"] = (*shape, 3, 3)
        layout[f"control_model.input_hint_block.block.{index}.bias"] = (shape[0],)
    return layout


def random_state(layout: dict[str, tuple], seed=3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.arange(shape[-1]).expand(shape).clone() if k.endswith("position_ids")
                else torch.randn(shape, generator=g)) for k, shape in layout.items()}


def test_featinv_layout_checkpoint_loads_strictly(tmp_path):
    config = OmegaConf.load(FEATINV_TINY)
    base_state = build_model(tiny_config(1000)).state_dict()
    state = random_state(featinv_layout(config, base_state))
    path = tmp_path / "control_featinv_tiny_fin.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, path)   # as Lightning writes it
    model = build_model(config)
    dropped = load_featinv_checkpoint(model, path)
    assert dropped == sorted(["logvar", SD_V1_IGNORABLE_KEYS[2]])
    own = model.state_dict()
    assert own.keys() == state.keys() - set(dropped)
    assert all(torch.equal(own[k], state[k]) for k in own)


def test_featinv_layout_missing_zero_conv_is_an_error(tmp_path):
    config = OmegaConf.load(FEATINV_TINY)
    state = random_state(featinv_layout(config, build_model(tiny_config(1000)).state_dict()))
    del state["control_model.zero_convs.2.0.bias"]
    torch.save(state, tmp_path / "broken.ckpt")
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

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decoder_file_round_trip(tmp_path, tiny_sd, dtype):
    record = tiny_record(tiny_sd)
    model = randomise(build_decoder_model(record, tiny_sd / "tiny.yaml"))
    save_decoder(model, record, tmp_path / "decoder.safetensors", dtype=dtype)
    assert read_record(tmp_path / "decoder.safetensors") == record
    loaded, loaded_record = load_decoder(tmp_path / "decoder.safetensors", tiny_sd / "tiny.ckpt",
                                         tiny_sd / "tiny.yaml")
    assert loaded_record == record
    for k, v in model.control_model.state_dict().items():
        assert torch.equal(loaded.control_model.state_dict()[k], v.to(dtype).float())
    base = torch.load(tiny_sd / "tiny.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in base.items())


def test_decoder_of_another_hint_width_is_refused(tmp_path, tiny_sd):
    record, wrong = tiny_record(tiny_sd), tiny_record(tiny_sd, hidden=8)
    save_decoder(build_decoder_model(wrong, tiny_sd / "tiny.yaml"), record, tmp_path / "mislabelled.safetensors")
    with pytest.raises(CheckpointMismatchError, match="input_hint_block.block.1.weight"):
        load_decoder(tmp_path / "mislabelled.safetensors", tiny_sd / "tiny.ckpt", tiny_sd / "tiny.yaml")
