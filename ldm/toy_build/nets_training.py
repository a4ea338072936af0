"""Reusable training / evaluation helpers for the toy world's small nets.

Used by ``scripts/train_toy.py``; everything is seeded and CPU-friendly.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ldm.toy import world
from ldm.toy.nets import HEAD_SPECS, SmallCNN, decode_head, encode_target, multitask_loss
from ldm.toy.oracle import gaussian_blur, warp

# augmentation presets: maximum strength of each perturbation (drawn per image)
AUGMENT = {
    "none": {},
    "light": {"noise": 0.03, "blur": 0.5, "p": 0.5},
    "strong": {"noise": 0.10, "blur": 1.5, "warp_px": 1.5, "gain": 0.15, "p": 0.8},
}


def augment(x: torch.Tensor, preset: str, g: torch.Generator) -> torch.Tensor:
    """Random label-preserving perturbation of a batch in [0, 1] (see :data:`AUGMENT`).

    With probability ``p`` per image: per-channel gain jitter, elastic warp,
    Gaussian blur (one of a few sigmas) and additive Gaussian noise.
    """
    cfg = AUGMENT[preset]
    if not cfg:
        return x
    n = x.shape[0]
    on = (torch.rand(n, generator=g) < cfg["p"]).float().view(n, 1, 1, 1)
    y = x
    if cfg.get("gain"):
        gain = 1 + cfg["gain"] * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
        y = y * gain
    if cfg.get("warp_px"):
        y = warp(y, cfg["warp_px"] * float(torch.rand((), generator=g)), g)
    if cfg.get("blur"):
        sig = torch.rand(n, generator=g) * cfg["blur"]
        levels = torch.linspace(0, cfg["blur"], 4)
        idx = (sig[:, None] - levels[None]).abs().argmin(1)
        out = y.clone()
        for k, s in enumerate(levels.tolist()):
            sel = idx == k
            if sel.any() and s > 0:
                out[sel] = gaussian_blur(y[sel], s)
        y = out
    if cfg.get("noise"):
        y = y + torch.randn(y.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * cfg["noise"]
    return (on * y + (1 - on) * x).clamp(0, 1)


def targets_for(heads, labels: dict[str, torch.Tensor], idx=None) -> dict[str, torch.Tensor]:
    """Training targets of ``heads`` (optionally indexed by ``idx``)."""
    out = {}
    for h in heads:
        v = labels[h] if idx is None else labels[h][idx]
        out[h] = encode_target(h, v)
    return out


def train_net(net: SmallCNN, images: torch.Tensor, labels: dict[str, torch.Tensor], *, steps: int,
              batch_size: int = 128, lr: float = 3e-3, weight_decay: float = 1e-4,
              augment_preset: str = "none", loss_weights: dict | None = None, seed: int = 0, desc: str = "train",
              log: Callable[[str], None] = print, log_every: int = 50) -> list[dict]:
    """AdamW + one-cycle schedule on random minibatches; returns the loss history."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    heads = list(net.heads.keys())
    history, run, t0 = [], None, time.time()
    net.train()
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=2.0)
    for step in bar:
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = augment(images[idx], augment_preset, g)
        loss, parts = multitask_loss(net(x), targets_for(heads, labels, idx), loss_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        lv = float(loss.detach())
        run = lv if run is None else 0.95 * run + 0.05 * lv
        if step % log_every == 0 or step == steps - 1:
            rec = {"step": step, "loss": round(run, 5), **{k: round(v, 5) for k, v in parts.items()},
                   "lr": round(sched.get_last_lr()[0], 6), "time_s": round(time.time() - t0, 1)}
            history.append(rec)
            bar.set_postfix(loss=f"{run:.4f}")
            log(f"[{desc}] " + " ".join(f"{k}={v}" for k, v in rec.items()))
    net.eval()
    return history


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch_size: int = 500):
    """Apply ``fn`` in batches and concatenate (tensors or dicts of tensors)."""
    outs = [fn(x[k:k + batch_size]) for k in range(0, len(x), batch_size)]
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)


@torch.no_grad()
def evaluate_heads(net: SmallCNN, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy of classification heads, mean error (px) of size / position heads."""
    pred = batched(lambda b: {h: decode_head(h, o) for h, o in net(b).items()}, images)
    res = {}
    for h, p in pred.items():
        if HEAD_SPECS[h][0] == "class":
            res[f"{h}_acc"] = float((p == labels[h]).float().mean())
        elif h == "size":
            res["size_mae_px"] = float((p - labels[h]).abs().mean())
        else:
            res["position_err_px"] = float((p - labels[h]).norm(dim=1).mean())
    return res


def _standardise(train: torch.Tensor, test: torch.Tensor):
    mu, sd = train.mean(0), train.std(0).clamp(min=1e-6)
    return (train - mu) / sd, (test - mu) / sd


def linear_probe_class(f_train, y_train, f_test, y_test, n_classes: int, weight_decay: float = 1e-3,
                       iters: int = 200) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression (L-BFGS)."""
    a, b = _standardise(f_train, f_test)
    torch.manual_seed(0)
    lin = torch.nn.Linear(a.shape[1], n_classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(a), y_train) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(b).argmax(1) == y_test).float().mean())


def linear_probe_reg(f_train, y_train, f_test, y_test, ridge: float = 1.0) -> dict[str, float]:
    """Ridge regression probe: test R^2 and mean absolute / Euclidean error."""
    a, b = _standardise(f_train, f_test)
    a1 = torch.cat([a, torch.ones(len(a), 1)], 1).double()
    b1 = torch.cat([b, torch.ones(len(b), 1)], 1).double()
    y = y_train.double().view(len(a), -1)
    w = torch.linalg.solve(a1.T @ a1 + ridge * torch.eye(a1.shape[1], dtype=torch.float64), a1.T @ y)
    pred = (b1 @ w).float()
    yt = y_test.view(len(b), -1)
    r2 = 1 - ((pred - yt) ** 2).sum() / ((yt - yt.mean(0)) ** 2).sum()
    err = (pred - yt).norm(dim=1).mean()
    return {"r2": float(r2), "err": float(err)}


def variance_explained(features: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of the features' total variance explained by the class means of ``y``
    (eta^2); how much the attribute moves the feature in L2, which is what a
    feature-matching guidance loss sees."""
    f = features - features.mean(0)
    total = (f ** 2).sum()
    between = sum(float((y == c).sum()) * (f[y == c].mean(0) ** 2).sum() for c in y.unique())
    return float(between / total)


def size_bins(size: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Equal-width bins of the size range (for variance explained)."""
    lo, hi = world.SIZE_RANGE
    return ((size - lo) / (hi - lo) * n).long().clamp(0, n - 1)


def position_bins(pos: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Index of the cell of an n x n grid over the image holding the centre."""
    cell = (pos / world.IMAGE_SIZE * n).long().clamp(0, n - 1)
    return cell[:, 1] * n + cell[:, 0]


def probe_report(f_train, lab_train, f_test, lab_test) -> dict[str, dict]:
    """Linear probes + variance explained for every attribute of the world."""
    out = {}
    for name, n_cls in (("shape", len(world.SHAPES)), ("colour", len(world.COLOUR_NAMES)),
                        ("size_class", 2), ("background", len(world.BACKGROUNDS))):
        out[name] = {"probe_acc": round(linear_probe_class(f_train, lab_train[name], f_test, lab_test[name], n_cls), 4),
                     "chance": round(1 / n_cls, 4),
                     "var_explained": round(variance_explained(f_test, lab_test[name]), 4)}
    size = linear_probe_reg(f_train, lab_train["size"], f_test, lab_test["size"])
    pos = linear_probe_reg(f_train, lab_train["position"], f_test, lab_test["position"])
    out["size"] = {"probe_r2": round(size["r2"], 4), "probe_mae_px": round(size["err"], 3),
                   "var_explained_4bins": round(variance_explained(f_test, size_bins(lab_test["size"])), 4)}
    out["position"] = {"probe_r2": round(pos["r2"], 4), "probe_err_px": round(pos["err"], 3),
                       "var_explained_4x4bins": round(variance_explained(f_test, position_bins(lab_test["position"])), 4)}
    return out


def change_attribute(a: world.Attributes, attr: str, rng: np.random.Generator) -> world.Attributes:
    """Copy of ``a`` with only ``attr`` re-drawn to a different value (the
    position is clamped back inside the image if the new extent needs it)."""
    d = a.to_dict()
    if attr == "shape":
        d["shape"] = rng.choice([s for s in world.SHAPES if s != a.shape])
    elif attr == "colour":
        d["colour"] = rng.choice([c for c in world.COLOUR_NAMES if c != a.colour])
    elif attr == "background":
        d["background"] = float(rng.choice([b for b in world.BACKGROUNDS if b != a.background]))
    elif attr == "size":
        d["size"] = float(rng.uniform(*world.SIZE_RANGE))
        d["size_class"] = world.size_class_of(d["size"])
    elif attr == "position":
        left, right, up, down = world.half_extents(a.shape, a.size)
        d["cx"] = float(rng.uniform(world.MARGIN + left, world.IMAGE_SIZE - world.MARGIN - right))
        d["cy"] = float(rng.uniform(world.MARGIN + up, world.IMAGE_SIZE - world.MARGIN - down))
    else:
        raise ValueError(attr)
    left, right, up, down = world.half_extents(d["shape"], d["size"])
    d["cx"] = float(np.clip(d["cx"], world.MARGIN + left, world.IMAGE_SIZE - world.MARGIN - right))
    d["cy"] = float(np.clip(d["cy"], world.MARGIN + up, world.IMAGE_SIZE - world.MARGIN - down))
    return world.Attributes.from_dict(d)


@torch.no_grad()
def attribute_sensitivity(net: SmallCNN, n: int = 400, seed: int = 0) -> dict[str, dict[str, float]]:
    """How far the feature moves when ONE attribute changes, relative to pairs of
    independent images (1.0 = as different as unrelated images, 0 = invariant),
    for the squared L2 distance and the cosine distance ``1 - cos``: what a
    feature-matching guidance loss sees."""
    rng = np.random.default_rng(seed)
    base = [world.sample_attributes(rng) for _ in range(n)]
    other = [world.sample_attributes(rng) for _ in range(n)]

    def feats(attrs):
        return net.features(torch.from_numpy(np.stack([world.render(a) for a in attrs])).permute(0, 3, 1, 2))

    def dists(f, g):
        return float(((f - g) ** 2).sum(1).mean()), float((1 - F.cosine_similarity(f, g, dim=1)).mean())

    f0 = feats(base)
    ref = dists(f0, feats(other))
    out = {"l2": {}, "cosine": {}}
    for attr in ("shape", "colour", "size", "position", "background"):
        d = dists(f0, feats([change_attribute(a, attr, rng) for a in base]))
        out["l2"][attr] = round(d[0] / ref[0], 4)
        out["cosine"][attr] = round(d[1] / ref[1], 4)
    return out


def set_threads(n: int = 1) -> None:
    """Torch intra-op threads (1 is far faster than 2 when other jobs share 2 cores)."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def file_kib(path: str) -> float:
    return math.ceil(os.path.getsize(path) / 102.4) / 10
