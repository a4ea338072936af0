"""The three target extractors (ResNet-50, ViT-H/14, CLIP RN50): wiring, preprocessing, weights.

No pretrained weights are available offline, so models are randomly initialised, saved to a
local file and loaded back through `weights=`. The full-size ViT-H/14 never runs a forward here:
its class is tested with a small torchvision VisionTransformer and its shapes on `meta`.
"""
import os
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision.models import ResNet50_Weights, ViT_H_14_Weights, resnet50
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

import ldm.extractors.weights as W
from ldm.checkpoint import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from ldm.extractors import (ClipRN50Extractor, FeatureExtractor, ResNet50Extractor,
                            TextTargetNotSupported, VitH14Extractor, WeightsNotFoundError,
                            build_extractor)
from ldm.objectives import FeatureDistance, squared_distance

SMALL_VIT_DIM = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory):
    return tmp_path_factory.mktemp("extractors")


def headless(model: nn.Module, head: str) -> nn.Module:
    model.set_submodule(head, nn.Identity())
    return model.eval()


@pytest.fixture(scope="module")
def resnet_file(tmp_module):
    """A random torchvision ResNet-50 (torchvision layout, with fc.*) saved by torch.save, and
    that model without its head."""
    torch.manual_seed(0)
    model = resnet50(weights=None)
    path = tmp_module / "resnet50-random.pth"
    torch.save(model.state_dict(), path)
    return path, headless(model, "fc")


@pytest.fixture(scope="module")
def resnet(resnet_file):
    return ResNet50Extractor(weights=str(resnet_file[0]))


@pytest.fixture(scope="module")
def clip_file(tmp_module):
    """A random open_clip RN50 saved in float16 (as OpenAI's weights are) to .safetensors, and
    the float32 model holding the same (rounded) values."""
    torch.manual_seed(0)
    model = ClipRN50Extractor.architecture()
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_module / "open_clip_model.safetensors"
    save_file(state, str(path))
    model.load_state_dict(state)
    return path, model.eval()


@pytest.fixture(scope="module")
def clip(clip_file):
    return ClipRN50Extractor(weights=clip_file[0])


def small_vit() -> VisionTransformer:
    return VisionTransformer(image_size=VitH14Extractor.preprocessing.input_size, patch_size=14, num_layers=1,
                             num_heads=2, hidden_dim=SMALL_VIT_DIM, mlp_dim=64)


@pytest.fixture
def small_vit_class(monkeypatch):
    """VitH14Extractor whose architecture is a 1-layer, 32-wide ViT/14 at 518 (fast)."""
    monkeypatch.setattr(VitH14Extractor, "architecture", classmethod(lambda cls: small_vit()))
    return VitH14Extractor


@pytest.fixture(scope="module")
def photo():
    """A photo-like RGB image (smooth shading, texture, edges), 640×427 like a landscape JPEG."""
    rng = np.random.default_rng(0)
    h, w = 427, 640
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.stack([200 * x + 30 * np.sin(12 * y), 160 * (1 - y) + 40 * x * y,
                    90 + 120 * y * (1 - x)], -1)
    img[(x - 0.6) ** 2 + (y - 0.5) ** 2 < 0.04] = (220, 40, 30)  # a sharp-edged disc
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def normalised_batch(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# --- registry ---------------------------------------------------------------------------------
def test_registry_and_exports():
    paper = {"clip_rn50": ClipRN50Extractor, "resnet50": ResNet50Extractor, "vit_h_14": VitH14Extractor}
    for name, cls in paper.items():
        assert cls.name == name and issubclass(cls, FeatureExtractor)
        assert type(build_extractor(name, weights="random")) is cls
    with pytest.raises(ValueError, match="clip_rn50, resnet50, toy_all, toy_colour, toy_shape, vit_h_14"):
        build_extractor("resnet_50")
    assert callable(squared_distance) and issubclass(FeatureDistance, nn.Module)
    assert issubclass(WeightsNotFoundError, FileNotFoundError)
    assert issubclass(WeightsNotFoundError, CheckpointError)


def test_build_extractor_passes_weights(resnet_file):
    extractor = build_extractor("resnet50", weights=str(resnet_file[0]), device="cpu")
    assert isinstance(extractor, ResNet50Extractor)


def test_class_constants():
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for cls, size in ((ResNet50Extractor, 224), (VitH14Extractor, 518)):
        p = cls.preprocessing
        assert (p.input_size, p.mean, p.std, p.generated) == (size, *imagenet, "reference")
    assert ClipRN50Extractor.preprocessing.input_size == 224
    assert ClipRN50Extractor.preprocessing.mean == (0.48145466, 0.4578275, 0.40821073)
    assert ClipRN50Extractor.preprocessing.std == (0.26862954, 0.26130258, 0.27577711)


# --- local weights round trip ----------------------------------------------------------------
def test_resnet_round_trip(resnet, resnet_file):
    x = normalised_batch(224)
    with torch.no_grad():
        got, want = resnet.encode(x), resnet_file[1](x)
    assert got.shape == (2, 2048) and (got >= 0).all()  # post-ReLU average pool
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert isinstance(resnet.model.fc, nn.Identity)


def test_clip_round_trip_casts_fp16_to_fp32(clip, clip_file):
    x = normalised_batch(224)
    with torch.no_grad():
        got, want = clip.encode(x), clip_file[1].encode_image(x)
    assert got.shape == (2, 1024) and got.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in clip.parameters())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got.norm(dim=-1), torch.ones(2))  # not L2-normalised


def test_clip_uses_quickgelu_text_tower(clip):
    from open_clip.transformer import QuickGELU
    assert any(isinstance(m, QuickGELU) for m in clip.model.transformer.modules())


def test_vit_wiring_with_small_vit(small_vit_class, tmp_path):
    torch.manual_seed(0)
    model = small_vit()
    path = tmp_path / "vit.safetensors"
    save_file(model.state_dict(), str(path))  # torchvision layout, heads.head.* included
    extractor = small_vit_class(weights=str(path))
    assert isinstance(extractor.model.heads.head, nn.Identity)
    assert all(not p.requires_grad for p in extractor.parameters())
    assert not extractor.train().training
    x = normalised_batch(518, 1)
    with torch.no_grad():
        torch.testing.assert_close(extractor.encode(x), headless(model, "heads.head")(x),
                                   rtol=0, atol=0)
    images = (torch.rand(1, 3, 64, 64) * 2 - 1).requires_grad_()  # resized to 518 inside
    features = extractor(images)
    assert features.shape == (1, SMALL_VIT_DIM)
    # A fixed random projection: the feature is a LayerNorm output (weight 1, bias 0), whose plain
    # sum is 0 whatever the image, so its gradient is 0 up to rounding.
    projection = torch.randn(SMALL_VIT_DIM, generator=torch.Generator().manual_seed(0))
    (features * projection).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 1e-6


def test_headless_file_loads(small_vit_class, tmp_path):
    torch.manual_seed(0)
    model = small_vit()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    torch.save(state, tmp_path / "vit-headless.pt")
    extractor = small_vit_class(weights=tmp_path / "vit-headless.pt")
    x = normalised_batch(518, 1)
    with torch.no_grad():
        torch.testing.assert_close(extractor.encode(x), headless(model, "heads.head")(x))


def test_vit_h_14_shapes_on_meta():
    with torch.device("meta"):
        model = VitH14Extractor.architecture()
    assert model.image_size == 518 and model.patch_size == 14
    assert sum(p.numel() for p in model.parameters()) == ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1.meta["num_params"]
    headless(model, "heads.head")
    assert model(torch.empty(2, 3, 518, 518, device="meta")).shape == (2, 1280)


# --- frozen, eval, differentiable ------------------------------------------------------------
@pytest.fixture(params=["resnet", "clip"])
def extractor(request):
    return request.getfixturevalue(request.param)


def test_frozen_and_stays_in_eval(extractor):
    assert all(not p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.training and not any(m.training for m in extractor.modules())


def test_forward_is_differentiable(extractor):
    images = (torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    images.requires_grad_()
    features = extractor(images)
    assert features.dtype == torch.float32
    assert features.shape == (1, {"resnet50": 2048, "clip_rn50": 1024}[extractor.name])
    features.pow(2).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_virtual_save_equals_png_round_trip(extractor, tmp_path):
    """A 224×224 generated image: features of virtual_save == features of the saved PNG."""
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(3)) * 2 - 1
    pixels = torch.round((images[0] + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(tmp_path / "out.png")
    with torch.no_grad():
        virtual = extractor(images)
        reloaded = extractor.image_features(Image.open(tmp_path / "out.png"))
    torch.testing.assert_close(virtual, reloaded, rtol=1e-5, atol=1e-5)


# --- preprocessing equals the libraries' own transforms ---------------------------------------
def test_resnet_preprocessing_follows_reference(resnet, photo):
    """The reference resized to 224 (bicubic) and cropped 224; the V1 weights' own transforms
    resize to 256 bilinear. Same pipeline as torchvision's transform with the reference's sizes."""
    v1 = ResNet50_Weights.IMAGENET1K_V1.transforms()
    assert (v1.resize_size, v1.crop_size, v1.interpolation) == ([256], [224], InterpolationMode.BILINEAR)
    reference = ImageClassification(crop_size=224, resize_size=224,
                                     interpolation=InterpolationMode.BICUBIC)
    ours = resnet.preprocess_image(photo)
    assert ours.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours[0], reference(photo), rtol=0, atol=1e-6)
    assert not torch.allclose(ours[0], v1(photo), atol=1e-2)  # intentionally not the V1 transform


def test_vit_preprocessing_equals_swag_transforms(photo):
    library = ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1.transforms()
    assert (library.resize_size, library.crop_size, library.interpolation) == (
        [518], [518], InterpolationMode.BICUBIC)
    extractor = VitH14Extractor.__new__(VitH14Extractor)  # preprocessing needs no weights
    ours = extractor.preprocess_image(photo)
    assert ours.shape == (1, 3, 518, 518)
    torch.testing.assert_close(ours[0], library(photo), rtol=0, atol=1e-6)


def test_clip_preprocessing_equals_open_clip(clip, photo):
    """open_clip's eval transform for RN50/openai (what create_model_and_transforms builds)."""
    import open_clip
    cfg = open_clip.get_pretrained_cfg("RN50", "openai")
    library = open_clip.image_transform(224, is_train=False, mean=cfg["mean"], std=cfg["std"],
                                        interpolation=cfg["interpolation"],
                                        resize_mode=cfg["resize_mode"])
    assert (cfg["mean"], cfg["std"]) == (clip.preprocessing.mean, clip.preprocessing.std)
    for image in (photo, photo.transpose(Image.Transpose.TRANSPOSE), photo.convert("L")):
        torch.testing.assert_close(clip.preprocess_image(image)[0], library(image), rtol=0, atol=0)


# --- text --------------------------------------------------------------------------------------
def test_clip_text(clip):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            features = clip.encode_text(["a photo of a dog", "A black motorbike parked on the dry ground"])
    assert features.shape == (2, 1024) and torch.isfinite(features).all()
    assert clip.supports_text() and ClipRN50Extractor.supports_text()


def test_clip_warns_on_long_prompt(clip):
    prompt = "a very long prompt " * 30
    with pytest.warns(UserWarning, match=r"\d+ tokens.*77") as record:
        with torch.no_grad():
            features = clip.encode_text([prompt])
    assert features.shape == (1, 1024)
    assert str(len(clip.tokenizer.encode(prompt)) + 2) in str(record[0].message)


def test_image_only_extractors_refuse_text(resnet):
    vit = VitH14Extractor.__new__(VitH14Extractor)  # encode_text needs no weights
    for extractor in (resnet, vit):
        assert not extractor.supports_text()
        with pytest.raises(TextTargetNotSupported):
            extractor.encode_text(["a dog"])


# --- bad weights files --------------------------------------------------------------------------
def test_mismatched_file_names_keys(tmp_path):
    save_file(small_vit().state_dict(), str(tmp_path / "vit.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        ResNet50Extractor(weights=str(tmp_path / "vit.safetensors"))
    message = str(err.value)
    assert "torchvision resnet50" in message
    assert "missing from the file" in message and "conv1.weight" in message
    assert "unexpected in the file" in message and "class_token" in message


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"PK\x03\x04 garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        ResNet50Extractor(weights=str(tmp_path / "bad.pth"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        ClipRN50Extractor(weights=str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointNotFoundError, match="extractor_weights.*nope.pth"):
        ResNet50Extractor(weights=str(tmp_path / "nope.pth"))


def test_torchscript_rn50_is_refused_with_advice(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(tmp_path / "RN50.pt"))
    with pytest.raises(CheckpointError) as err:
        ClipRN50Extractor(weights=str(tmp_path / "RN50.pt"))
    message = str(err.value)
    assert "TorchScript" in message and "open_clip_model.safetensors" in message
    assert "convert" in message


# --- caches and the offline failure -------------------------------------------------------------
@pytest.fixture
def no_download(monkeypatch):
    """The probe gets 'connection refused' from a local port; a download would fail the test."""
    real_probe = W.probe
    monkeypatch.setattr(W, "probe", lambda url, timeout=None: real_probe("http://127.0.0.1:9/x", 2))

    def fail(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)


@pytest.mark.parametrize("cls, filename", [
    (ResNet50Extractor, "resnet50-0676ba61.pth"),
    (VitH14Extractor, "vit_h_14_swag-80465313.pth"),
])
def test_torchvision_offline_fails_fast(cls, filename, empty_caches, no_download):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        cls()
    assert time.perf_counter() - start < 10
    message = str(err.value)
    expected_path = empty_caches / "torch" / "hub" / "checkpoints" / filename
    assert str(expected_path) in message
    assert f"https://download.pytorch.org/models/{filename}" in message
    assert "--extractor_weights PATH" in message and cls.default_weights.name in message


def test_clip_offline_fails_fast(empty_caches):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        ClipRN50Extractor()
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message
    assert "open_clip_model.safetensors" in message
    assert "https://huggingface.co/timm/resnet50_clip.openai/resolve/main/open_clip_model.safetensors" in message
    drop_in = empty_caches / "home" / ".cache" / "clip" / "timm" / "resnet50_clip.openai"
    assert str(drop_in / "open_clip_model.safetensors") in message
    assert str(empty_caches / "hf" / "hub") in message
    assert "--extractor_weights PATH" in message and "RN50.pt" in message


def test_probe_fails_fast_when_refused():
    start = time.perf_counter()
    reason = W.probe("http://127.0.0.1:9/weights.pth", timeout=5)
    assert reason and "127.0.0.1:9" in reason and time.perf_counter() - start < 5


def test_resolve_reports_failed_download(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "probe", lambda url, timeout=None: None)  # "online"

    def download():
        raise OSError("connection reset")

    source = W.WeightsSource(model="m", tag="t", filename="f.pth", url="https://x/f.pth",
                             drop_in=tmp_path / "f.pth", cached=lambda: [], download=download)
    with pytest.raises(WeightsNotFoundError, match=r"(?s)download failed.*connection reset.*f\.pth"):
        W.resolve(source)
    save_file({"w": torch.ones(1)}, str(tmp_path / "f.safetensors"))
    source.download = lambda: tmp_path / "f.safetensors"  # a downloaded file: safe loader
    assert torch.equal(W.resolve(source)["w"], torch.ones(1))


def test_torchvision_cache_is_picked_up(resnet_file, empty_caches, no_download):
    cache = empty_caches / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    os.symlink(resnet_file[0], cache / "resnet50-0676ba61.pth")
    extractor = ResNet50Extractor()
    x = normalised_batch(224, 1)
    with torch.no_grad():
        torch.testing.assert_close(extractor.encode(x), resnet_file[1](x), rtol=0, atol=0)


def test_clip_drop_in_is_picked_up(clip_file, empty_caches):
    drop_in = empty_caches / "home" / ".cache" / "clip" / "timm" / "resnet50_clip.openai"
    drop_in.mkdir(parents=True)
    os.symlink(clip_file[0], drop_in / "open_clip_model.safetensors")
    source = W.open_clip_source("RN50", "openai")
    assert source.cached() == [drop_in / "open_clip_model.safetensors"]
    extractor = ClipRN50Extractor()
    x = normalised_batch(224, 1)
    with torch.no_grad():
        torch.testing.assert_close(extractor.encode(x), clip_file[1].encode_image(x), rtol=0, atol=0)


def test_clip_hf_cache_is_found(empty_caches):
    repo = empty_caches / "hf" / "hub" / "models--timm--resnet50_clip.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert W.open_clip_source("RN50", "openai").cached() == [snapshot / "open_clip_pytorch_model.bin"]
