"""Targets (images, text, feature files, feature arithmetic) and the objective (squared or
cosine loss, channel subsets, spatial maps)."""
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm.objectives import FeatureDistance, parse_channels, squared_distance
from ldm.targets import (Target, TargetError, expand_targets, load_feature_file, parse_target,
                         read_target_list, target_features, unique_labels)

REPO = Path(__file__).resolve().parents[1]
CAT = str(REPO / "data/examples/chelsea.jpg")
COFFEE = str(REPO / "data/examples/coffee.jpg")


# --- parsing --------------------------------------------------------------------------------
def test_kinds_and_labels(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros(4, np.float32))
    assert parse_target(CAT) == Target("image", CAT, "chelsea")
    assert parse_target(str(tmp_path / "f.npy")).kind == "features"
    text = parse_target("a photo of a dog")
    assert text.kind == "text" and text.label.startswith("text_a_photo_of_a_dog_")
    assert parse_target(CAT, text_only=True).kind == "text"
    expr = parse_target(f'image("{CAT}") + 0.5*(text("a dog") - text("a cat"))')
    assert expr.kind == "expression" and expr.label.startswith("expr_")
    assert expr.leaves() == [("image", CAT), ("text", "a dog"), ("text", "a cat")]


@pytest.mark.parametrize("spec, message", [
    ("missing.png", "looks like an image path, but no such file exists"),
    ("missing.npy", "looks like a feature file path"),
    ('image("missing.png") + text("x")', "image('missing.png'): no such file"),
    ('image("a.png") / (1 - 1)', "divides by zero"),
    ('image + text("x")', "'image' alone is not a term"),
    ('__import__("os").system("true") + text("x")', "is not one of image"),
    ('text("a").upper() + text("b")', "is not one of image"),
    ('text("a") + os', "'os' alone is not a term"),
    ('text("a") + [1]', "is not allowed"),
    ('text(1) + text("b")', "is not one of image"),
    ("", "empty target"),
])
def test_bad_targets_are_named(spec, message):
    with pytest.raises(TargetError, match=re.escape(message)):
        parse_target(spec)


def test_what_is_not_python_is_a_caption():
    """Captions with parentheses (or an unclosed one) are text, with a warning saying why."""
    for caption in ("a photo of an image (blurry)", 'image("a.png"'):
        with pytest.warns(UserWarning, match="is read as a text prompt"):
            target = parse_target(caption)
        assert (target.kind, target.source) == ("text", caption)
    long = "a photo of a dog " * 40          # over the file system's 255-byte name limit
    assert parse_target(long).kind == "text" and expand_targets([long])[0].kind == "text"


def test_labels_never_collide_and_avoid_reserved_names():
    targets = [Target("image", f"{d}/{n}", stem) for d, n, stem in
               (("a", "x.png", "x"), ("b", "x.png", "x"), ("c", "x_2.png", "x_2"), ("d", "X.png", "X"),
                ("e", "index.json.png", "index.json"))]
    # case-insensitive, as macOS and Windows folders are: X is x, and x_2, x_3 are taken
    assert [t.label for t in unique_labels(targets)] == ["x", "x_3", "x_2", "X_4", "index.json_2"]


def test_feature_files_keep_their_suffix_in_the_label(tmp_path):
    for suffix in (".npy", ".pt"):
        path = tmp_path / f"feat{suffix}"
        path.write_bytes(b"x")
        assert parse_target(str(path)).label == f"feat_{suffix[1:]}"


def test_folders_lists_and_unique_labels(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "cat.png").write_bytes(Path(CAT).read_bytes())
    (tmp_path / "a" / "notes.txt").write_text("x")
    targets = expand_targets([str(tmp_path / "a"), str(tmp_path / "b"), "a dog"])
    assert [t.label for t in targets][:2] == ["cat", "cat_2"]
    assert [t.kind for t in targets] == ["image", "image", "text"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(TargetError, match="holds no image files"):
        expand_targets([str(tmp_path / "empty")])
    listing = tmp_path / "list.txt"
    listing.write_text(f"# targets\n{CAT}\n\n  a red car  \n")
    assert read_target_list(str(listing)) == [CAT, "a red car"]
    (tmp_path / "blank.txt").write_text("# nothing\n")
    with pytest.raises(TargetError, match="holds no targets"):
        read_target_list(str(tmp_path / "blank.txt"))


# --- feature files --------------------------------------------------------------------------
def test_feature_files_of_every_format(tmp_path):
    value = torch.randn(2, 3)
    np.save(tmp_path / "f.npy", value.numpy())
    torch.save(value, tmp_path / "f.pt")
    torch.save({"features": value}, tmp_path / "d.pt")
    save_file({"anything": value}, str(tmp_path / "f.safetensors"))
    save_file({"features": value, "other": value * 2}, str(tmp_path / "g.safetensors"))
    for name in ("f.npy", "f.pt", "d.pt", "f.safetensors", "g.safetensors"):
        assert torch.equal(load_feature_file(str(tmp_path / name)), value), name
    save_file({"a": value, "b": value * 2}, str(tmp_path / "two.safetensors"))
    with pytest.raises(TargetError, match="name the target one 'features'"):
        load_feature_file(str(tmp_path / "two.safetensors"))
    np.save(tmp_path / "ints.npy", np.arange(3))
    with pytest.raises(TargetError, match="one floating-point tensor"):
        load_feature_file(str(tmp_path / "ints.npy"))


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/pwned_by_feature_file"),))


def test_feature_files_never_run_pickled_code(tmp_path):
    Path("/tmp/pwned_by_feature_file").unlink(missing_ok=True)
    torch.save({"features": _Payload()}, tmp_path / "evil.pt")
    np.save(tmp_path / "evil.npy", np.array([_Payload()], dtype=object), allow_pickle=True)
    for name in ("evil.pt", "evil.npy"):
        with pytest.raises(TargetError, match="cannot read the feature file"):
            load_feature_file(str(tmp_path / name))
    assert not Path("/tmp/pwned_by_feature_file").exists()
    assert pickle  # the payload above is a pickle gadget


# --- feature arithmetic ---------------------------------------------------------------------
LEAVES = {("image", CAT): torch.tensor([[1.0, 2.0]]), ("text", "a dog"): torch.tensor([[3.0, 0.0]]),
          ("text", "a cat"): torch.tensor([[1.0, 1.0]])}


def leaf(kind, source):
    return LEAVES[(kind, source)]


def test_arithmetic_combines_terms():
    expr = parse_target(f'image("{CAT}") + 0.5 * (text("a dog") - text("a cat")) / 2')
    assert torch.allclose(target_features(expr, leaf), torch.tensor([[1.5, 1.75]]))
    neg = parse_target('-text("a dog") + 2 * text("a cat")')
    assert torch.allclose(target_features(neg, leaf), torch.tensor([[-1.0, 2.0]]))
    assert torch.equal(target_features(parse_target(CAT), leaf), LEAVES[("image", CAT)])


@pytest.mark.parametrize("expr, message", [
    ('text("a dog") * text("a cat")', "scaled by numbers"),
    ('text("a dog") + 1', "added to or subtracted from features only"),
    ('1 / text("a dog")', "divide features by numbers only"),
])
def test_arithmetic_refuses_what_has_no_meaning(expr, message):
    with pytest.raises(TargetError, match=message):
        target_features(parse_target(expr), leaf)


def test_feature_shape_is_checked(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros(3, np.float32))
    target = parse_target(str(tmp_path / "f.npy"))
    with pytest.raises(TargetError, match=r"gives features of shape \(1, 3\).*\(1, 2\)"):
        target_features(target, lambda k, s: load_feature_file(s), feature_shape=(2,))
    assert target_features(target, lambda k, s: load_feature_file(s), feature_shape=(3,)).shape == (1, 3)


# --- objectives -----------------------------------------------------------------------------
class Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_channel_subsets_parse():
    assert parse_channels("0:3,5, 4") == [0, 1, 2, 4, 5]
    assert parse_channels([3, 1, 3]) == [1, 3]
    for bad, message in [("a", "neither an index"), ("3:3", "empty range"), ("0:9", "out of range")]:
        with pytest.raises(ValueError, match=message):
            parse_channels(bad, size=4)


def test_spatial_maps_are_compared_position_by_position():
    target = torch.randn(1, 4, 3, 3)
    images = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss, cosine = FeatureDistance(Identity(), target)(images)
    expected = ((images - target) ** 2).sum(dim=(1, 2, 3))
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-4) and cosine.shape == (2,)
    loss.sum().backward()
    assert images.grad.abs().sum() > 0


def test_channels_select_dimension_one():
    target = torch.randn(1, 4, 2, 2)
    images = torch.randn(1, 4, 2, 2)
    loss, _ = FeatureDistance(Identity(), target, channels="1:3")(images)
    assert torch.allclose(loss, ((images - target)[:, 1:3] ** 2).sum(dim=(1, 2, 3)), atol=1e-5)
    changed = images.clone()
    changed[:, 0] += 10    # outside the subset: no effect
    assert torch.allclose(FeatureDistance(Identity(), target, channels="1:3")(changed)[0], loss)


def test_cosine_loss_ignores_the_norm():
    target = torch.randn(1, 8)
    images = torch.cat([target * 3, -target])
    loss, cosine = FeatureDistance(Identity(), target, loss="cosine")(images)
    assert torch.allclose(loss, torch.tensor([0.0, 2.0]), atol=1e-6)
    assert torch.allclose(cosine, torch.tensor([1.0, -1.0]), atol=1e-6)
    assert squared_distance(images, target.expand(2, -1))[0] > 1


def test_per_row_targets_and_shape_errors():
    targets = torch.randn(3, 5)
    loss, _ = FeatureDistance(Identity(), targets)(targets.clone())
    assert torch.allclose(loss, torch.zeros(3), atol=1e-5)
    with pytest.raises(ValueError, match="must come from the same extractor and layer"):
        FeatureDistance(Identity(), torch.randn(1, 6))(targets)
    with pytest.raises(ValueError, match="unknown loss"):
        FeatureDistance(Identity(), targets, loss="l1")
