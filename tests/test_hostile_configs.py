"""Sizes from strangers are checked before anything is allocated (issue 22): model configs (the
base model's and so a decoder's), TAESD gradient decoders, target expressions, make_tiny_sd's
schedule. Each is one clear error naming the value and its bounds."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import ldm.models.loading as loading
from ldm.checkpoint import CheckpointError
from ldm.models.taesd import TinyDecoder, TinyDecoderConfig, check_fits, load_taesd_decoder, save_taesd_decoder
from ldm.models.tiny_sd import TINY_CONFIG, main as make_tiny_sd
from ldm.targets import TargetError, parse_target
from ldm.util import ConfigError, instantiate_from_config
from tiny_models import TARGET

UNET = "model.params.unet_config.params"


def set_key(text: str, dotted: str, value) -> str:
    config = OmegaConf.create(text)
    OmegaConf.update(config, dotted, value, force_add=True)
    return OmegaConf.to_yaml(config)


CONFIGS = [   # (key, value, words of the error)
    (f"{UNET}.model_channels", 1e6, "model_channels is 1000000.0: it must be an integer"),
    (f"{UNET}.model_channels", 10 ** 6, "model_channels is 1000000: it must be an integer from 1 to 16,384"),
    (f"{UNET}.model_channels", -32, "model_channels is -32"),
    (f"{UNET}.channel_mult", [], "channel_mult is []: it must be a list of 1 to 8 integers"),
    (f"{UNET}.channel_mult", [1, "2"], "channel_mult is [1, '2']"),
    (f"{UNET}.num_head_channels", 0, "num_head_channels is 0: it must be -1 (unused)"),
    (f"{UNET}.surprise", 1, "holds 'surprise', which UNetModel does not take"),
    ("model.params.timesteps", 2 * 10 ** 9, "timesteps is 2000000000: it must be an integer from 1 to 100,000"),
    ("model.params.timesteps", -5, "timesteps is -5"),
    (f"{UNET}.model_channels", "${model.params.unet_config.params.model_channels}", "interpolations cannot be resolved"),
    ("model.params.first_stage_config.params.ddconfig.ch_mult", [1, 2, 3, 4, 5, 6, 7, 8, 9], "ch_mult is"),
]


@pytest.mark.parametrize("key, value, message", CONFIGS, ids=[m[:40] for _, _, m in CONFIGS])
def test_config_sizes_are_checked_before_anything_is_built(tmp_path, monkeypatch, key, value, message):
    path = tmp_path / "config.yaml"
    path.write_text(set_key(TINY_CONFIG.read_text(), key, value))
    monkeypatch.setattr(loading, "instantiate_from_config", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(ConfigError) as raised:
        loading.load_config(path)
    assert message in str(raised.value)


def test_a_config_built_directly_is_checked_too():
    with pytest.raises(ConfigError, match="num_head_channels is 0"):
        instantiate_from_config({"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                 "params": {"num_head_channels": 0}})


def taesd_file(tmp_path, fields) -> str:
    path = tmp_path / "taesd.safetensors"
    decoder = TinyDecoder(TinyDecoderConfig(width=4, upsamples=1, blocks_per_stage=1))
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(path),
              metadata={"taesd_config": json.dumps(fields)})
    return path


@pytest.mark.parametrize("fields, message", [
    ({"width": 200000}, "width 200000, not an integer from 1 to 1024"),
    ({"width": "64"}, "width '64', not an integer"),
    ({"latent_channels": 0}, "latent_channels 0"),
    ({"upsamples": 1, "surprise": 2}, "is not one"),
    ([1, 2], "is not one"),
])
def test_gradient_decoder_architectures_are_bounded(tmp_path, fields, message):
    with pytest.raises(CheckpointError) as raised:
        load_taesd_decoder(taesd_file(tmp_path, fields))
    assert message in str(raised.value)


@pytest.mark.parametrize("config, message", [
    (TinyDecoderConfig(latent_channels=3, upsamples=1), "decodes 3-channel latents"),
    (TinyDecoderConfig(upsamples=3), "with 8x up-sampling, but this model's first stage has 4 channels and "
                                     "down-samples 2x"),
])
def test_a_gradient_decoder_of_another_model_is_refused(tmp_path, config, message):
    save_taesd_decoder(TinyDecoder(config), tmp_path / "t.safetensors")
    decoder = load_taesd_decoder(tmp_path / "t.safetensors")
    check_fits(TinyDecoderConfig(upsamples=1), 4, 2, "fine")     # the tiny SD's own: no error
    with pytest.raises(CheckpointError, match="give the TAESD decoder of this model") as raised:
        check_fits(decoder.config, 4, 2, tmp_path / "t.safetensors")
    assert message in str(raised.value)


IMAGE = f'image("{TARGET}")'


@pytest.mark.parametrize("expression, message", [
    (" + ".join([IMAGE] * 2000), "characters: at most 20,000"),
    (" + ".join(["image(\"a.png\")"] * 500), "more than 100 levels of nesting or 1,000 parts"),
    ("-" * 3000 + IMAGE, "nested too deeply to parse"),
    ("-" * 1000 + IMAGE, "more than 100 levels of nesting"),
    (f"{IMAGE} * {'9' * 401}", "is out of range"),
    (f"{IMAGE} * 1e999", "the number inf is out of range"),
])
def test_target_expressions_are_bounded(expression, message):
    with pytest.raises(TargetError) as raised:
        parse_target(expression)
    assert message in str(raised.value)
    assert parse_target(f"{IMAGE} * 2 - {IMAGE}").kind == "expression"


@pytest.mark.parametrize("value", ["0", "-5", "2000000000"])
def test_make_tiny_sd_refuses_an_empty_or_huge_schedule(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as raised:
        make_tiny_sd([str(tmp_path / "out"), "--timesteps", value])
    assert raised.value.code == 2
    assert f"error: --timesteps {value}: must be from 1 to 100,000" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file", ["featinv_all_spatial.safetensors", "ldm.safetensors"])
def test_extractor_weights_of_another_network_are_refused(file):
    from ldm.paths import shipped
    from ldm.toy.nets import load_net
    with pytest.raises(CheckpointError, match="is not a toy network's weights"):
        load_net(str(shipped("models/toy") / file))


def test_nan_weights_are_blamed_not_the_target():
    from ldm.objectives import check_target
    from tiny_models import TinyExtractor
    extractor = TinyExtractor()
    with torch.no_grad():
        extractor.net[0].weight.fill_(float("nan"))
    feature = extractor.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"the target model's weights hold NaN or inf values \(net.0.weight\)"):
        check_target(feature, model=extractor)
    with pytest.raises(ValueError, match="the target feature holds NaN or inf values"):
        check_target(feature)
