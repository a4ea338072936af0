"""FeatInv's training pairs: both views show the same crop; the toy world's are reproducible."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.extractors.preprocessing import Preprocessing
from ldm.featinv.data import ImageFolderPairs, ToyWorldPairs, list_images, skip_unreadable
from ldm.featinv.train_command import spread_over_classes

UNIT = Preprocessing(input_size=12, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def quadrants(path, size=(60, 40)) -> None:
    """An image whose four quadrants are red, green, blue and white."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2:] = (0, 255, 0)
    a[h // 2:, : w // 2] = (0, 0, 255)
    a[h // 2:, w // 2:] = (255, 255, 255)
    Image.fromarray(a).save(path)


def test_both_views_are_the_same_crop(tmp_path):
    quadrants(tmp_path / "a.png")
    data = ImageFolderPairs(list_images(tmp_path), resolution=24, preprocessing=UNIT, augment=True)
    torch.manual_seed(0)
    for _ in range(20):   # random crops and flips
        item = data[0]
        image = (item["image"] + 1) / 2
        assert image.shape == (3, 24, 24) and item["pixels"].shape == (3, 12, 12)
        small = F.interpolate(image[None], size=(12, 12), mode="area")[0]
        assert (small - item["pixels"]).abs().mean() < 0.05


def test_validation_view_is_the_centre_square(tmp_path):
    quadrants(tmp_path / "a.png", size=(80, 40))
    item = ImageFolderPairs(list_images(tmp_path), 24, UNIT, augment=False)[0]
    # the centre 40x40 square of an 80x40 image holds all four quadrants equally
    torch.testing.assert_close(item["pixels"].mean((1, 2)),
                               torch.tensor([0.5, 0.5, 0.5]), atol=0.02, rtol=0)
    pixels = item["pixels"]
    assert pixels[:, 0, 0].tolist() == pytest.approx([1, 0, 0], abs=0.01)   # top-left: red


def test_toy_items_are_fixed_by_seed_and_index():
    a = ToyWorldPairs(100, seed=5, resolution=32, preprocessing=UNIT)
    b = ToyWorldPairs(3, seed=5, resolution=32, preprocessing=UNIT)
    assert torch.equal(a[2]["image"], b[2]["image"])
    assert not torch.equal(a[1]["image"], a[2]["image"])
    assert not torch.equal(ToyWorldPairs(3, 6, 32, UNIT)[2]["image"], b[2]["image"])
    assert a[2]["pixels"].shape == (3, 12, 12) and a[2]["index"] == 2


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    quadrants(tmp_path / "a.png")
    Image.fromarray(np.full((30, 30), 128, np.uint8)).save(tmp_path / "grey.png")   # mode L
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = ImageFolderPairs(list_images(tmp_path), 24, UNIT, augment=False)
    batch = skip_unreadable([data[k] for k in range(len(data))])
    assert batch["image"].shape == (2, 3, 24, 24) and int(batch["skipped"]) == 1


def test_held_out_images_spread_over_the_classes():
    files = [Path(f"/data/class{c:02d}/img{i}.jpg") for c in range(10) for i in range(3)]
    held_out = spread_over_classes(files, 4)
    assert len({f.parent for f in held_out}) == 4
    assert {f.parent.name for f in held_out} != {"class00", "class01", "class02", "class03"}
    assert spread_over_classes(files, 4) == held_out
    assert len(set(spread_over_classes(files, 12))) == 12   # more than the classes: round-robin
