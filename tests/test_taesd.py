"""The tiny TAESD-style decoder: public SD v1 weight layout, loading, shapes, gradients, and the
shipped toy decoder against the full toy decoder."""
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointMismatchError, CheckpointNotFoundError
from ldm.models.taesd import (SD_V1, SoftClamp, TinyDecoder, TinyDecoderConfig, TinyFirstStage,
                              load_taesd_decoder, save_taesd_decoder, stored_config)
from ldm.util import count_params

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_WEIGHTS = REPO_ROOT / "models" / "toy" / "taesd_decoder.safetensors"

# The public SD v1 decoder file (taesd_decoder.pth / .safetensors) as read from
# madebyollin/taesd: one nn.Sequential; index 0 is the parameter-free clamp, the residual
# blocks hold three 3x3 convs at conv.0/2/4, the convs after each upsampling have no bias.
_BLOCKS = (3, 4, 5, 8, 9, 10, 13, 14, 15, 18)
_UPSAMPLE_CONVS = (7, 12, 17)
PUBLIC_SD_V1_DECODER = {
    "1.weight": (64, 4, 3, 3), "1.bias": (64,),
    **{f"{b}.conv.{c}.{p}": (64, 64, 3, 3) if p == "weight" else (64,)
       for b in _BLOCKS for c in (0, 2, 4) for p in ("weight", "bias")},
    **{f"{i}.weight": (64, 64, 3, 3) for i in _UPSAMPLE_CONVS},
    "19.weight": (3, 64, 3, 3), "19.bias": (3,),
}
PUBLIC_DECODER_PARAMS = 1_222_531  # "Parameters in Decoder" of the TAESD README


pytestmark = pytest.mark.usefixtures("one_thread")


def random_public_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.02 for k, shape in PUBLIC_SD_V1_DECODER.items()}


def test_public_layout_matches_the_sd_configuration():
    own = {k: tuple(v.shape) for k, v in TinyDecoder(SD_V1).state_dict().items()}
    assert own == PUBLIC_SD_V1_DECODER
    assert count_params(TinyDecoder(SD_V1)) == PUBLIC_DECODER_PARAMS
    assert sum(torch.Size(s).numel() for s in PUBLIC_SD_V1_DECODER.values()) == PUBLIC_DECODER_PARAMS


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_public_file_loads_strictly(tmp_path, suffix):
    state_dict = random_public_state_dict()
    path = tmp_path / f"taesd_decoder{suffix}"
    if suffix == ".pth":  # what torch.save(decoder.state_dict()) writes
        torch.save(OrderedDict(state_dict), path)
    else:
        save_file(state_dict, str(path))
    decoder = load_taesd_decoder(path)
    assert decoder.config == SD_V1
    assert not any(p.requires_grad for p in decoder.parameters())
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, state_dict[k]), k


def test_mismatching_file_names_missing_and_unexpected_keys(tmp_path):
    state_dict = random_public_state_dict()
    del state_dict["19.bias"]
    state_dict["20.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "broken.safetensors"
    save_file(state_dict, str(path))
    with pytest.raises(CheckpointMismatchError) as err:
        load_taesd_decoder(path)
    assert "19.bias" in str(err.value) and "20.weight" in str(err.value)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="TAESD decoder weights not found"):
        load_taesd_decoder(tmp_path / "nope.safetensors")


def test_saved_architecture_round_trips(tmp_path):
    config = TinyDecoderConfig(width=16, upsamples=2, blocks_per_stage=1)
    decoder, path = TinyDecoder(config), tmp_path / "toy.safetensors"
    save_taesd_decoder(decoder, path)
    assert stored_config(path) == config
    loaded = load_taesd_decoder(path)
    z = torch.randn(2, 4, 8, 8)
    assert torch.equal(loaded(z), decoder(z))
    with pytest.raises(CheckpointMismatchError):  # an explicit config wins over the stored one
        load_taesd_decoder(path, config=SD_V1)


def test_sd_shapes():
    with torch.device("meta"):
        image = TinyFirstStage(TinyDecoder(SD_V1))(torch.empty(1, 4, 64, 64))
    assert image.shape == (1, 3, 512, 512)
    # real values at a small size: 4x4 latents -> 32x32 images
    decoder = TinyDecoder(SD_V1)
    z = torch.randn(1, 4, 4, 4)
    assert decoder(z).shape == (1, 3, 32, 32)
    assert torch.allclose(TinyFirstStage(decoder)(z), decoder(z) * 2 - 1)


def test_soft_clamp_bounds_latents_and_keeps_small_ones():
    x = torch.tensor([-100.0, -0.1, 0.0, 0.1, 100.0])
    y = SoftClamp()(x)
    assert y.abs().max() <= 3 and torch.allclose(y[1:4], x[1:4], atol=1e-3)


@pytest.fixture(scope="module")
def toy():
    """(toy LDM, shipped tiny decoder wrapper, held-out clean latents)."""
    from ldm.models.loading import load_model
    from ldm.toy import world
    from ldm.toy.defaults import TOY_CKPT, TOY_CONFIG
    from ldm.toy_build.taesd_training import EVAL_SEED, encode_latents

    model = load_model(REPO_ROOT / TOY_CONFIG, REPO_ROOT / TOY_CKPT)
    images, _ = world.make_dataset(8, EVAL_SEED)
    return model, TinyFirstStage(load_taesd_decoder(TOY_WEIGHTS)), encode_latents(model, images)


def test_shipped_toy_decoder_is_small_and_close_to_the_full_decoder(toy):
    from ldm.toy_build.taesd_training import TOY_TAESD

    model, tiny, z = toy
    assert tiny.decoder.config == TOY_TAESD and TOY_WEIGHTS.stat().st_size < 1.1e6
    with torch.no_grad():
        tiny_img, full_img = tiny(z[:1]), model.decode_first_stage(z[:1])
        assert tiny_img.shape == (1, 3, 32, 32)
        tiny_img, full_img = tiny(z), model.decode_first_stage(z)
    assert tiny_img.min() > -1.3 and tiny_img.max() < 1.3
    assert (tiny_img - full_img).abs().mean() / 2 < 0.03  # mean error in [0, 1] pixel units


def test_gradients_reach_the_latent(toy):
    _, tiny, z = toy
    z = z[:2].clone().requires_grad_(True)
    tiny(z).square().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in tiny.parameters())


def test_feature_gradients_point_like_the_full_decoders(toy):
    from ldm.extractors.registry import build_extractor
    from ldm.toy_build.taesd_training import gradient_cosine

    model, tiny, z = toy
    extractor = build_extractor("toy:all")
    with torch.no_grad():  # each latent's target: the feature of another image
        target = extractor(model.decode_first_stage(z.roll(1, 0)))
    # about 0.6 on average over held-out latents (see ldm/toy_build/taesd_training.py), ~0 untrained
    assert gradient_cosine(tiny, model, extractor, z, target).mean() > 0.3
