"""Small CNNs for the toy world: target extractors and the oracle's shape net.

A :class:`SmallCNN` takes images in [0, 1] (shape [N, 3, 32, 32]) and normalises
them itself with the fixed constants :data:`IMAGE_MEAN` / :data:`IMAGE_STD`
(the toy extractors' normalisation).  ``features(x)`` is the globally pooled
penultimate layer (the vector that serves as a decoding target) and
``forward(x)`` returns a dict ``head name -> output`` computed from it.

Heads are described by :data:`HEAD_SPECS`: classification heads output logits,
regression heads output targets in normalised units (see :func:`decode_head`).
Weights are stored as ``.safetensors`` whose metadata holds the architecture,
so :func:`load_net` rebuilds a net from the file alone.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file

from ldm.checkpoint import CheckpointError, load_into

from . import world

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)

# head name -> (kind, output width)
HEAD_SPECS = {
    "shape": ("class", len(world.SHAPES)),
    "colour": ("class", len(world.COLOUR_NAMES)),
    "size_class": ("class", len(world.SIZE_CLASSES)),
    "background": ("class", len(world.BACKGROUNDS)),
    "size": ("reg", 1),
    "position": ("reg", 2),
}
_SIZE_MID = sum(world.SIZE_RANGE) / 2
_SIZE_HALF = (world.SIZE_RANGE[1] - world.SIZE_RANGE[0]) / 2
_POS_HALF = world.IMAGE_SIZE / 2


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> network input, with the fixed toy mean / std."""
    mean = x.new_tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_target(name: str, value: torch.Tensor) -> torch.Tensor:
    """Label tensor from :func:`world.labels` -> training target of head ``name``."""
    if name == "size":
        return ((value - _SIZE_MID) / _SIZE_HALF).unsqueeze(-1)
    if name == "position":
        return (value - _POS_HALF) / _POS_HALF
    return value


def decode_head(name: str, out: torch.Tensor) -> torch.Tensor:
    """Head output -> prediction: class index, size in px or (cx, cy) in px."""
    if HEAD_SPECS[name][0] == "class":
        return out.argmax(-1)
    if name == "size":
        return out.squeeze(-1) * _SIZE_HALF + _SIZE_MID
    return out * _POS_HALF + _POS_HALF


def _conv(cin: int, cout: int, groups: int, k: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=1, bias=False),
            nn.GroupNorm(groups, cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Small CPU-friendly CNN with a pooled feature vector and linear heads.

    Stage 0 starts with a 4x4 stride-2 conv (32 -> 16 px), every later stage
    with 2x2 average pooling; stage ``i`` has ``depths[i]`` conv-GroupNorm-ReLU
    layers of width ``widths[i]``.  Then 2x2 pooling, a 1x1 conv to
    ``feat_dim``, GroupNorm, ReLU and global average pooling give the feature.
    ``coords=True`` appends two coordinate channels (x, y in [-1, 1]) to the
    input (CoordConv), which lets the pooled feature encode object position.
    """

    def __init__(self, heads=("shape",), widths=(24, 32, 64), depths=(1, 1, 2), feat_dim=128,
                 coords=False, groups=8):
        super().__init__()
        self.config = {"heads": list(heads), "widths": list(widths), "depths": list(depths),
                       "feat_dim": feat_dim, "coords": bool(coords), "groups": groups}
        self.coords = coords
        layers, cin = [], 3 + (2 if coords else 0)
        for i, (w, d) in enumerate(zip(widths, depths)):
            if i:
                layers.append(nn.AvgPool2d(2))
            for j in range(d):
                first = i == 0 and j == 0
                layers += _conv(cin, w, groups, k=4 if first else 3, stride=2 if first else 1)
                cin = w
        layers += [nn.AvgPool2d(2), nn.Conv2d(cin, feat_dim, 1, bias=False),
                   nn.GroupNorm(groups, feat_dim), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({h: nn.Linear(feat_dim, HEAD_SPECS[h][1]) for h in heads})

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x)
        if self.coords:
            n, _, h, w = x.shape
            ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
            xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
            x = torch.cat([x, xs, ys], 1)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features [N, feat_dim] of images in [0, 1]."""
        return self.body(self._input(x)).mean((2, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {h: head(f) for h, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoded predictions per head (class indices, sizes / positions in px)."""
        return {h: decode_head(h, o) for h, o in self(x).items()}


def save_net(net: SmallCNN, path: str, extra: dict | None = None) -> None:
    """Save weights + architecture (and optional ``extra`` info) as safetensors.

    The metadata is one JSON string (key ``toy_net``) so the file bytes are
    reproducible (safetensors does not keep the order of several keys).
    """
    meta = {"toy_net": json.dumps({"config": net.config, "extra": extra or {}}, sort_keys=True)}
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, path, metadata=meta)
    os.chmod(path, 0o644)


def read_metadata(path: str) -> dict:
    """``{"config": SmallCNN kwargs, "extra": ...}`` stored by :func:`save_net`; CheckpointError
    for a file without it (e.g. another network's weights)."""
    try:
        with safe_open(path, framework="pt") as f:
            record = json.loads((f.metadata() or {})["toy_net"])
        if not isinstance(record.get("config"), dict):
            raise ValueError("no config")
        return record
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for other files
        raise CheckpointError(f"{path} is not a toy network's weights ({type(err).__name__}: {err}): give "
                              "a file written by scripts/train_toy.py") from None


def load_net(path: str, device: str | torch.device = "cpu") -> SmallCNN:
    """Rebuild a :class:`SmallCNN` from a file written by :func:`save_net` (eval mode)."""
    try:
        net = SmallCNN(**read_metadata(path)["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its toy network config cannot be built ({err})") from None
    load_into(net, load_file(path), ignorable=(), expected=f"the toy network of {path}")
    return net.to(device).eval()


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def multitask_loss(outputs: dict, targets: dict, weights: dict | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of cross-entropy (classification heads) and 5x smooth-L1
    (regression heads, normalised units); ``weights`` maps head -> factor (default 1)."""
    total, parts = 0.0, {}
    for name, out in outputs.items():
        if HEAD_SPECS[name][0] == "class":
            loss = F.cross_entropy(out, targets[name])
        else:
            loss = F.smooth_l1_loss(out, targets[name], beta=0.1) * 5.0
        total = total + (weights or {}).get(name, 1.0) * loss
        parts[name] = float(loss.detach())
    return total, parts
