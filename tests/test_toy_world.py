"""Toy world: generator determinism and coverage, oracle accuracy, shipped nets.

Thresholds come from the measurements in ``models/toy/metrics.json`` (2000
held-out images), loosened to stay robust on the smaller samples used here.
"""

import json
import math
import os

import numpy as np
import pytest
import torch

from ldm.toy import world
from ldm.toy.nets import SmallCNN, load_net, read_metadata
from ldm.toy.oracle import Oracle, degrade, score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models", "toy")
TEST_SEED = 4242  # not used by any training / evaluation split


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fresh():
    return world.make_dataset(300, TEST_SEED)


def test_make_dataset_is_deterministic():
    a, attrs_a = world.make_dataset(24, 7)
    b, attrs_b = world.make_dataset(24, 7)
    c, _ = world.make_dataset(24, 8)
    assert a.shape == (24, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and attrs_a == attrs_b
    assert not torch.equal(a, c)
    assert torch.equal(world.make_dataset(5, 7)[0], a[:5])  # prefix does not depend on n
    assert torch.equal(torch.round(a * 255) / 255, a)        # 8-bit levels: PNG round trip is exact
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_every_attribute_value_is_reachable():
    rng = np.random.default_rng(0)
    attrs = [world.sample_attributes(rng) for _ in range(600)]
    assert {a.shape for a in attrs} == set(world.SHAPES)
    assert {a.colour for a in attrs} == set(world.COLOURS)
    assert {a.background for a in attrs} == set(world.BACKGROUNDS)
    assert {a.size_class for a in attrs} == set(world.SIZE_CLASSES)
    sizes = np.array([a.size for a in attrs])
    assert sizes.min() >= world.SIZE_RANGE[0] and sizes.max() <= world.SIZE_RANGE[1]
    assert len(world.COLOURS) >= 6 and 3 <= len(world.BACKGROUNDS) <= 4
    d = attrs[0].to_dict()
    assert world.Attributes.from_dict(json.loads(json.dumps(d))) == attrs[0]


def test_objects_inside_bounds_with_exact_area_and_centroid():
    rng = np.random.default_rng(1)
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    for _ in range(200):
        a = world.sample_attributes(rng)
        cov = world.coverage_mask(a.shape, a.size, a.cx, a.cy)
        ring = np.concatenate([cov[0], cov[-1], cov[:, 0], cov[:, -1]])
        assert ring.max() == 0, a                        # object never touches the border pixels
        area = cov.sum()
        assert abs(math.sqrt(area / math.pi) - a.size) < 0.1, a
        assert abs((cov * xs).sum() / area - a.cx) < 0.1 and abs((cov * ys).sum() / area - a.cy) < 0.1
        img = world.render(a)
        assert np.all(img[0] == np.float32(round(a.background * 255) / 255))


def test_extreme_shapes_stay_inside():
    for shape in world.SHAPES:
        left, right, up, down = world.half_extents(shape, world.SIZE_RANGE[1])
        assert left + right + 2 * world.MARGIN < 32 and up + down + 2 * world.MARGIN < 32


def test_oracle_reads_clean_images(fresh):
    x, attrs = fresh
    readings = Oracle().read_batch(x)
    s = score(readings, attrs)
    # measured on 2000 images: shape/colour/background 100 %, size class 99.55 %,
    # max position error 0.081 px, max size error 0.073 px, clean rate 100 %
    assert s["shape_acc"] == 1.0 and s["colour_acc"] == 1.0 and s["background_acc"] == 1.0
    assert s["size_class_acc"] >= 0.98
    assert s["pos_err_max_px"] < 0.15 and s["size_max_err_px"] < 0.15
    assert s["clean_rate"] == 1.0


def test_oracle_reads_degraded_images(fresh):
    x, attrs = fresh
    y = degrade(x[:150], noise=0.05, blur=0.8, seed=3)
    s = score(Oracle().read_batch(y), attrs[:150])
    assert s["shape_acc"] >= 0.99 and s["colour_acc"] == 1.0 and s["background_acc"] == 1.0
    assert s["size_class_acc"] >= 0.95 and s["pos_err_mean_px"] < 0.15 and s["clean_rate"] >= 0.97


def test_oracle_flags_unclean_images(fresh):
    x, _ = fresh
    bad = torch.stack([
        torch.full((3, 32, 32), 0.4),                      # no object
        torch.maximum(x[0], x[1]),                         # two objects
        x[2].mean(0, keepdim=True).expand(3, 32, 32),      # grey object
        torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)),  # noise
    ])
    assert not any(r.clean for r in Oracle().read_batch(bad))


def test_shipped_samples_match_their_attributes():
    folder = os.path.join(ROOT, "data", "toy")
    with open(os.path.join(folder, "attributes.json")) as f:
        records = json.load(f)
    assert len(records) >= 8
    assert {r["shape"] for r in records.values()} == set(world.SHAPES)
    oracle = Oracle()
    for name, rec in records.items():
        truth = world.Attributes.from_dict(rec)
        img = world.load_image(os.path.join(folder, name))
        assert torch.equal(img, torch.from_numpy(world.render(truth)).permute(2, 0, 1))
        r = oracle.read(img)
        assert (r.shape, r.colour, r.background) == (truth.shape, truth.colour, truth.background)
        assert name == f"{name[:7]}{truth.colour}_{truth.shape}.png"


def test_save_samples_roundtrip(tmp_path):
    attrs = world.save_samples(str(tmp_path), n=4, seed=3)
    files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
    assert files == sorted(f"toy_{i:02d}_{a.colour}_{a.shape}.png" for i, a in enumerate(attrs))
    img = world.load_image(str(tmp_path / files[0]))
    assert img.shape == (3, 32, 32)


@pytest.mark.parametrize("name,thresholds", [
    # measured on 2000 held-out images: shape 99.9 %, colour 100 %, all-net:
    # shape 99.9 %, colour 100 %, size class 98.45 %, position 0.54 px, background 100 %
    ("extractor_shape", {"shape_acc": 0.98}),
    ("extractor_colour", {"colour_acc": 0.99}),
    ("extractor_all", {"shape_acc": 0.98, "colour_acc": 0.99, "size_class_acc": 0.95,
                       "background_acc": 0.99}),
    ("oracle_shape", {"shape_acc": 0.98}),
])
def test_shipped_nets_load_and_classify(fresh, name, thresholds):
    from ldm.toy_build.nets_training import evaluate_heads

    path = os.path.join(MODELS, f"{name}.safetensors")
    net = load_net(path)
    assert isinstance(net, SmallCNN) and read_metadata(path)["config"] == net.config
    x, attrs = fresh
    res = evaluate_heads(net, x, world.labels(attrs))
    for key, t in thresholds.items():
        assert res[key] >= t, (name, res)
    if "position_err_px" in res:
        assert res["position_err_px"] < 0.8
    with torch.no_grad():
        f = net.features(x[:5])
    assert f.shape == (5, net.config["feat_dim"]) and torch.isfinite(f).all()


def test_shipped_weights_are_small():
    sizes = {f: os.path.getsize(os.path.join(MODELS, f)) for f in os.listdir(MODELS) if f.endswith(".safetensors")}
    nets = [f for f in sizes if f.startswith(("extractor_", "oracle_"))]
    assert len(nets) == 4 and sum(sizes[f] for f in nets) < 2 * 1024 * 1024       # the small CNNs
    # Everything (the LDM 14 MB, the tiny decoder, six FeatInv decoders of 2.85 MB: 33.2 MB)
    # stays under the 40 MB the toy world may take.
    assert sum(sizes.values()) <= 40 * 1000 ** 2


def test_features_are_differentiable():
    net = SmallCNN(heads=("shape", "position"))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    net.features(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    out = net(x)
    assert out["shape"].shape == (2, 4) and out["position"].shape == (2, 2)


def test_train_net_smoke():
    from ldm.toy_build.nets_training import train_net

    x, attrs = world.make_dataset(64, 5)
    net = SmallCNN(heads=("colour", "size"), widths=(8, 8, 8), feat_dim=16)
    hist = train_net(net, x, world.labels(attrs), steps=3, batch_size=16, augment_preset="strong",
                     log=lambda s: None)
    assert hist and math.isfinite(hist[-1]["loss"])
