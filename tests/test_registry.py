"""Extractors by name (`library:model[@layer]`), layer hooks, ModuleExtractor.

Only random weights and files written here: torchvision resnet18, timm's tiny `test_resnet` and
`test_vit` (160 px), and a one-layer ViT in place of ViT-H/14. Nothing is downloaded.
"""
import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import ldm.extractors.weights as W
from ldm.extractors import (LIBRARIES, ClipRN50Extractor, ExtractorSpec, ExtractorSpecError,
                            ModuleExtractor, ResNet50Extractor,
                            TextTargetNotSupported, TorchvisionExtractor, UnknownLayerError,
                            VitH14Extractor, WeightsNotFoundError, build_extractor,
                            list_extractors, list_layers, parse_spec)
from ldm.extractors.timm_models import TimmExtractor


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    img[20:60, 30:90] = (200, 40, 30)
    return Image.fromarray(img, "RGB")


def batch(size: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def r18_layer3():
    return build_extractor("torchvision:resnet18@layer3", weights="random")


def up_to_layer3(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer3(model.layer2(model.layer1(x)))


# --- spec grammar -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, want", [
    ("torchvision:resnet50", ("torchvision", "resnet50", None, "torchvision:resnet50")),
    ("torchvision:resnet50@layer3", ("torchvision", "resnet50", "layer3", "torchvision:resnet50@layer3")),
    ("torchvision:convnext_tiny", ("torchvision", "convnext_tiny", None, "torchvision:convnext_tiny")),
    ("timm:resnet18@layer2.1", ("timm", "resnet18", "layer2.1", "timm:resnet18@layer2.1")),
    ("timm:vit_small_patch16_224.augreg_in21k", ("timm", "vit_small_patch16_224.augreg_in21k", None,
                                                 "timm:vit_small_patch16_224.augreg_in21k")),
    ("open_clip:RN50", ("open_clip", "RN50", None, "open_clip:RN50")),
    ("OpenCLIP:ViT-B-32@transformer.resblocks.3", ("open_clip", "ViT-B-32", "transformer.resblocks.3",
                                                   "open_clip:ViT-B-32@transformer.resblocks.3")),
    ("toy:shape", ("toy", "shape", None, "toy:shape")),
    ("resnet50", ("torchvision", "resnet50", None, "resnet50")),
    ("clip_rn50", ("open_clip", "RN50", None, "clip_rn50")),
    ("vit_h_14@encoder.layers.encoder_layer_31", ("torchvision", "vit_h_14",
                                                  "encoder.layers.encoder_layer_31",
                                                  "vit_h_14@encoder.layers.encoder_layer_31")),
    ("toy_colour", ("toy", "colour", None, "toy_colour")),
])
def test_spec_forms_parse(spec, want):
    parsed = parse_spec(spec)
    assert (parsed.library, parsed.model, parsed.layer, parsed.name) == want
    assert parse_spec(str(parsed)) == ExtractorSpec(*want[:3])  # canonical form round trip


@pytest.mark.parametrize("spec, why", [
    ("", "empty"), ("resnet_50", "close: resnet50"), ("torchvision:resnet50@", "nothing after '@'"),
    ("torchvision:", "bad model name"), ("keras:resnet50", "unknown library 'keras'"),
    ("timm:a@b@c", "more than one '@'"), ("timm: resnet18", "spaces"),
])
def test_malformed_specs_show_the_grammar(spec, why):
    with pytest.raises(ExtractorSpecError, match="library:model\\[@layer\\]") as err:
        build_extractor(spec)
    assert why in str(err.value) and "torchvision, timm, open_clip" in str(err.value)


def test_text_support_known_from_the_spec():
    assert parse_spec("open_clip:RN50").supports_text and parse_spec("clip_rn50").supports_text
    assert not parse_spec("open_clip:RN50@layer3").supports_text
    assert not parse_spec("torchvision:resnet50").supports_text


def test_listing():
    names = list_extractors()
    assert {"resnet50", "clip_rn50", "vit_h_14", "toy_shape", "toy_colour", "toy_all"} <= set(names)
    assert set(LIBRARIES) == {"torchvision", "timm", "open_clip", "toy", "local"}   # registered
    assert list_extractors("toy") == ["toy:shape", "toy:colour", "toy:all"]
    assert {"torchvision:resnet50", "torchvision:vit_h_14", "open_clip:RN50"} <= set(names)
    assert "torchvision:convnext_tiny" in list_extractors("torchvision")
    assert "timm:test_vit" in list_extractors("timm")
    layers = list_layers("torchvision:resnet50@layer1")  # built on meta: instant, nothing loaded
    assert layers[:4] == ["conv1", "bn1", "relu", "maxpool"] and "layer3.5.conv2" in layers


# --- errors name the valid options, before any weights are read ----------------------------------
def test_unknown_layer_lists_names_nearby(tmp_path):
    missing = tmp_path / "never-read.pth"  # the layer is checked first: this file is not opened
    with pytest.raises(UnknownLayerError) as err:
        build_extractor("torchvision:resnet50@layer5", weights=str(missing))
    message = str(err.value)
    assert "valid names near 'layer5': layer1, layer2, layer3" in message and "layer4" in message
    with pytest.raises(UnknownLayerError) as err:
        build_extractor("torchvision:resnet50@layer3.9", weights=str(missing))
    assert "layer3.0, layer3.1, layer3.2, layer3.3, layer3.4, layer3.5" in str(err.value)
    assert issubclass(UnknownLayerError, ExtractorSpecError) and issubclass(ExtractorSpecError, ValueError)


@pytest.mark.parametrize("spec, weights, expected", [
    ("torchvision:resnt18", "random", ["no classification model 'resnt18'", "resnet18"]),
    ("timm:test_resnett", "random", ["timm has no model 'test_resnett'", "test_resnet"]),
    ("open_clip:RN5", "random", ["open_clip has no model 'RN5'", "RN50"]),
    ("torchvision:resnet18", "IMAGENET1K_V9", ["no weights 'IMAGENET1K_V9'", "IMAGENET1K_V1"]),
    ("timm:test_resnet", "b1_in1k", ["no pretrained tag 'b1_in1k'", "r160_in1k"]),
    ("toy:size", None, ["toy:shape, toy:colour, toy:all"]),
])
def test_unknown_model_or_weights_names_close_matches(spec, weights, expected):
    with pytest.raises(ExtractorSpecError) as err:
        build_extractor(spec, weights=weights)
    for text in expected:
        assert text in str(err.value)


def test_spatial_needs_a_layer():
    with pytest.raises(ExtractorSpecError, match="spatial=True needs a layer"):
        build_extractor("timm:test_resnet", weights="random", spatial=True)


@pytest.fixture
def offline(empty_caches, monkeypatch):
    """Empty caches (conftest), the Hugging Face Hub off, and any probe gets 'connection refused'."""
    real_probe = W.probe
    monkeypatch.setattr(W, "probe", lambda url, timeout=None: real_probe("http://127.0.0.1:9/x", 2))
    return empty_caches


def test_default_and_tagged_weights_offline_fail_fast(offline):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        build_extractor("timm:test_resnet")  # the default tag, r160_in1k
    assert "timm/test_resnet.r160_in1k" in str(err.value) and "model.safetensors" in str(err.value)
    with pytest.raises(WeightsNotFoundError) as err:  # not the paper's tag: the generic entry
        build_extractor("torchvision:resnet50", weights="IMAGENET1K_V2")
    assert "resnet50-11ad3fa6.pth" in str(err.value) and "IMAGENET1K_V2" in str(err.value)
    assert time.perf_counter() - start < 15


# --- paper models keep their classes -----------------------------------------------------------
def test_paper_entries_build_the_paper_classes():
    extractor = build_extractor("torchvision:resnet50", weights="random")
    assert type(extractor) is ResNet50Extractor and extractor.name == "torchvision:resnet50"
    # the reference's target transform, not the weights' own (256 bilinear)
    p = extractor.preprocessing
    assert (p.resize_size, p.interpolation, p.generated) == (None, InterpolationMode.BICUBIC, "reference")
    alias = build_extractor("resnet50@layer2", weights="random")
    assert type(alias) is ResNet50Extractor and alias.name == "resnet50@layer2"
    assert alias(torch.zeros(1, 3, 64, 64)).shape == (1, 512)


def test_open_clip_layer_has_no_text(tmp_path):
    extractor = build_extractor("open_clip:RN50@layer4", weights="random")
    assert isinstance(extractor, ClipRN50Extractor) and ClipRN50Extractor.supports_text()
    assert not extractor.supports_text()
    with pytest.raises(TextTargetNotSupported):
        extractor.encode_text(["a dog"])
    assert extractor(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)
    extractor.set_layer(None)  # the default feature is in the text space again
    assert extractor.supports_text() and extractor.encode_text(["a dog"]).shape == (1, 1024)


# --- timm -----------------------------------------------------------------------------------------
def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def test_timm_random_and_local_file(tmp_path):
    random = build_extractor("timm:test_resnet", weights="random")
    assert isinstance(random, TimmExtractor) and random.name == "timm:test_resnet"
    assert random.feature_shape() == (random.model.num_features,)
    torch.manual_seed(0)
    original = timm.create_model("test_resnet").eval()
    save_file(original.state_dict(), str(tmp_path / "full.safetensors"))
    headless = {k: v for k, v in original.state_dict().items() if not k.startswith("fc.")}
    save_file(headless, str(tmp_path / "headless.safetensors"))
    x = batch(160)
    with torch.no_grad():
        want = pre_logits(original, x)
        for name in ("full", "headless"):
            extractor = build_extractor("timm:test_resnet", weights=str(tmp_path / f"{name}.safetensors"))
            torch.testing.assert_close(extractor.encode(x), want, rtol=0, atol=0)
        assert not torch.allclose(random.encode(x), want)


def test_timm_preprocessing_from_pretrained_cfg(photo):
    extractor = build_extractor("timm:test_resnet", weights="random")
    cfg = extractor.model.pretrained_cfg
    assert (cfg["input_size"], cfg["interpolation"], cfg["crop_pct"]) == ((3, 160, 160), "bilinear", 0.95)
    p = extractor.preprocessing
    assert (p.input_size, p.resize_size) == (160, 168)  # floor(160 / 0.95)
    assert p.interpolation == InterpolationMode.BILINEAR
    assert (p.mean, p.std) == (cfg["mean"], cfg["std"]) == ((0.5,) * 3, (0.5,) * 3)
    library = timm.data.create_transform(**timm.data.resolve_data_config(model=extractor.model))
    torch.testing.assert_close(extractor.preprocess_image(photo)[0], library(photo), rtol=0, atol=1e-6)
    assert extractor.virtual_save(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 160, 160)


def test_timm_vit_tokens():
    pooled = build_extractor("timm:test_vit@blocks.0", weights="random")
    spatial = build_extractor("timm:test_vit@blocks.0", weights="random", spatial=True)
    spatial.load_state_dict(pooled.state_dict())
    model = pooled.model
    r = pooled.readout
    assert (r.prefix_tokens, r.class_token, r.token_grid) == (1, True, (10, 10))
    x = batch(160)
    with torch.no_grad():
        tokens = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x))))
        torch.testing.assert_close(pooled.encode(x), tokens[:, 0], rtol=0, atol=0)  # class token
        grid = spatial.encode(x)
    assert grid.shape == (2, model.embed_dim, 10, 10)
    torch.testing.assert_close(grid[:, :, 2, 7], tokens[:, 1 + 2 * 10 + 7], rtol=0, atol=0)


# --- torchvision generic entries and layers ----------------------------------------------------
def test_torchvision_layer_pooled_and_spatial(r18_layer3):
    spatial = build_extractor("torchvision:resnet18@layer3", weights="random", spatial=True)
    spatial.load_state_dict(r18_layer3.state_dict())
    x = batch(64)
    with torch.no_grad():
        want = up_to_layer3(r18_layer3.model, x)
        got_map, got_pooled = spatial.encode(x), r18_layer3.encode(x)
    assert want.shape == got_map.shape == (2, 256, 4, 4) and got_pooled.shape == (2, 256)
    torch.testing.assert_close(got_map, want, rtol=0, atol=0)
    torch.testing.assert_close(got_pooled, want.mean((2, 3)), rtol=0, atol=0)
    assert r18_layer3.feature_shape() == (256,) and spatial.feature_shape() == (256, 14, 14)


def test_forward_stops_at_the_layer_and_gradients_flow(r18_layer3):
    later = []
    handle = r18_layer3.model.layer4.register_forward_hook(lambda *args: later.append(1))
    try:
        images = (torch.rand(1, 3, 48, 48) * 2 - 1).requires_grad_()
        features = r18_layer3(images)
        features.pow(2).sum().backward()
    finally:
        handle.remove()
    assert later == []  # layer4 never ran
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert not r18_layer3._forward_hooks and not r18_layer3.model.layer3._forward_hooks


def test_torchvision_generic_file_and_transforms(tmp_path, photo):
    torch.manual_seed(0)
    original = resnet18(weights=None).eval()
    torch.save(original.state_dict(), tmp_path / "r18.pth")
    extractor = build_extractor("torchvision:resnet18", weights=str(tmp_path / "r18.pth"))
    assert type(extractor) is TorchvisionExtractor and extractor.name == "torchvision:resnet18"
    assert isinstance(extractor.model.fc, nn.Identity)  # the head was found and removed
    x = batch(64)
    with torch.no_grad():
        original.fc = nn.Identity()
        torch.testing.assert_close(extractor.encode(x), original(x), rtol=0, atol=0)
    transforms = ResNet18_Weights.IMAGENET1K_V1.transforms()
    p = extractor.preprocessing
    assert (p.input_size, p.resize_size, p.generated) == (224, 256, "target")
    assert p.interpolation == transforms.interpolation == InterpolationMode.BILINEAR
    torch.testing.assert_close(extractor.preprocess_image(photo)[0], transforms(photo), rtol=0, atol=1e-6)


def test_torchvision_vit_tokens(monkeypatch):
    """The ViT-H/14 class with a one-layer, 32-wide ViT/14 at 518: 37x37 patches + class token."""
    small = lambda cls: VisionTransformer(image_size=518, patch_size=14, num_layers=1,  # noqa: E731
                                          num_heads=2, hidden_dim=32, mlp_dim=64)
    monkeypatch.setattr(VitH14Extractor, "architecture", classmethod(small))
    layer = "vit_h_14@encoder.layers.encoder_layer_0"
    pooled = build_extractor(layer, weights="random")
    spatial = build_extractor(layer, weights="random", spatial=True)
    spatial.load_state_dict(pooled.state_dict())
    model, x = pooled.model, batch(518, 1)
    with torch.no_grad():
        tokens = model._process_input(x)
        tokens = torch.cat([model.class_token.expand(1, -1, -1), tokens], 1) + model.encoder.pos_embedding
        tokens = model.encoder.layers[0](tokens)
        torch.testing.assert_close(pooled.encode(x), tokens[:, 0], rtol=0, atol=0)
        grid = spatial.encode(x)
    assert grid.shape == (1, 32, 37, 37)
    torch.testing.assert_close(grid[0, :, 3, 5], tokens[0, 1 + 3 * 37 + 5], rtol=0, atol=0)


# --- ModuleExtractor --------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.head(self.stem(x))


def test_module_extractor_default_preprocessing(photo):
    module = Tiny()
    extractor = ModuleExtractor(module, input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, name="tiny")
    assert all(not p.requires_grad for p in module.parameters()) and not module.training
    images = torch.rand(2, 3, 48, 48) * 2 - 1
    x = TF.resize(torch.round((images + 1) * 127.5), [32, 32], InterpolationMode.BICUBIC, antialias=True)
    want = module(TF.normalize(torch.round(x) / 255, (0.5,) * 3, (0.25,) * 3))
    torch.testing.assert_close(extractor(images), want)
    assert extractor.preprocess_image(photo).shape == (1, 3, 32, 32) and extractor.feature_shape() == (4,)
    spatial = ModuleExtractor(module, input_size=32, layer="stem.1", spatial=True)
    assert spatial(images).shape == (2, 8, 32, 32)
    with pytest.raises(UnknownLayerError, match="near .stem.7x. .children of .stem. included.: stem, stem.0, stem.1 "):
        ModuleExtractor(module, layer="stem.7x")


def test_module_extractor_with_preprocess(photo):
    module = Tiny()
    preprocess = lambda x: F.interpolate(x, size=(20, 20), mode="bilinear") * 2 - 1  # noqa: E731
    extractor = ModuleExtractor(module, preprocess=preprocess, layer="stem")
    images = (torch.rand(1, 3, 40, 40) * 2 - 1).requires_grad_()
    got = extractor(images)
    want = module.stem(preprocess(torch.round((images + 1) * 127.5) / 255)).mean((2, 3))
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert images.grad.abs().sum() > 0  # through the straight-through rounding and preprocess
    target = extractor.preprocess_image(photo)
    torch.testing.assert_close(target, preprocess(TF.to_tensor(photo).unsqueeze(0)))
    assert extractor.image_features(photo).shape == (1, 8)
