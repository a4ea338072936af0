"""The toy world's comparison of decoders, where the truth is known (scripts/toy_benchmark.py
--compare): every decoder decodes the same held-out targets with the same seeds, and each is
measured the same way.

- Fidelity: the cosine between the target feature and the feature of the decoded image as saved
  (clamped, 8-bit), mean and worst.
- What the images keep: the oracle's agreement with the target on shape, colour, size class and
  position, for the attributes the extractor encodes and for those it does not (which should
  stay near chance), the share of clean images, and the variety across seeds of the attributes
  the feature does not encode (distinct values over the seeds of a target; 0 = always the same).
- The front (compare.png): fidelity, agreement on the encoded attributes and distance to chance
  on the others, each over FLOPs per inversion.
- Cost: denoiser (UNet) evaluations, extractor backward passes and seconds per target, and FLOPs
  per inversion (counted on one target with torch.utils.flop_counter).

Decoders are entries of `DECODERS`: a name and a function that decodes a batch of target
features (ldm/benchmarks/decoders.py).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ldm.benchmarks.flops import counted_flops
from ldm.objectives import cosine_similarity
from ldm.toy import world
from ldm.toy.names import TOY_NETS
from ldm.toy.oracle import Oracle

ATTRIBUTES = ("shape", "colour", "size_class")
# What each toy extractor was trained on: its feature encodes these (ldm/toy/nets.py).
ENCODED = TOY_NETS


@dataclass
class Costs:
    """Counted while a decoder runs."""

    denoiser: int = 0        # UNet evaluations
    backward: int = 0        # extractor evaluations with a gradient (each is followed by a backward pass)
    seconds: float = 0.0


class CountingModel:
    """A latent diffusion model that counts its UNet evaluations (everything else passes)."""

    def __init__(self, model, costs: Costs):
        self._model, self._costs = model, costs

    def __getattr__(self, name):
        return getattr(self._model, name)

    def apply_model(self, z, t, cond, *args, **kwargs):
        self._costs.denoiser += z.shape[0]
        return self._model.apply_model(z, t, cond, *args, **kwargs)


class CountingObjective:
    """An objective that counts the images it scores with a gradient."""

    def __init__(self, objective, costs: Costs):
        self._objective, self._costs = objective, costs

    def __getattr__(self, name):
        return getattr(self._objective, name)

    def __call__(self, images):
        if torch.is_grad_enabled() and images.requires_grad:
            self._costs.backward += images.shape[0]
        return self._objective(images)


def saved(images: torch.Tensor) -> torch.Tensor:
    """Images as a PNG holds them: clamped to [0, 1] and rounded to 8 bits."""
    return torch.round(images.clamp(0, 1) * 255) / 255


def fidelity(extractor, images: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return cosine_similarity(extractor(saved(images) * 2 - 1), goals)


def variety(readings_by_seed: list[list], attribute: str) -> float:
    """Mean over targets of (distinct values of `attribute` over the seeds − 1) / (seeds − 1)."""
    seeds = len(readings_by_seed)
    if seeds < 2:
        return float("nan")
    per_target = zip(*readings_by_seed)
    return float(np.mean([(len({getattr(r, attribute) for r in rs}) - 1) / (seeds - 1) for rs in per_target]))


def agreement(readings: list, truth: list) -> dict:
    out = {f"{a}_acc": float(np.mean([getattr(r, a) == getattr(t, a) for r, t in zip(readings, truth)]))
           for a in ATTRIBUTES}
    out["position_err_px"] = float(np.mean([math.hypot(r.cx - t.cx, r.cy - t.cy) for r, t in zip(readings, truth)]))
    out["clean_rate"] = float(np.mean([r.clean for r in readings]))
    return out


def measure(name: str, extractor_name: str, extractor, decode, costs: Costs, truth, goals,
            targets: torch.Tensor, seeds: list[int], oracle: Oracle) -> dict:
    """Decode with every seed (`decode(goals, targets, seed)` → images in [0, 1], counting into
    `costs`); → the row of the table. The FLOPs are counted once, on the first seed's decode of
    the whole batch (matmuls and convolutions scale with the batch: per inversion = total / n);
    the time is the other seeds' when there are any (the counter slows what it counts; with one
    seed the row says `timed_with_flop_counter`)."""
    images, start = [], time.perf_counter()
    flops = counted_flops(lambda: images.append(decode(goals, targets, seeds[0])))
    if len(seeds) > 1:
        start = time.perf_counter()
    images += [decode(goals, targets, seed) for seed in seeds[1:]]
    costs.seconds = (time.perf_counter() - start) * len(seeds) / max(1, len(seeds) - 1)
    cos = torch.cat([fidelity(extractor, x, goals) for x in images])
    readings = [oracle.read_batch(saved(x)) for x in images]
    n = len(goals) * len(seeds)
    row = {"decoder": name, "extractor": extractor_name, "targets": len(goals), "seeds": len(seeds),
           "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
           **{k: float(np.mean([agreement(r, truth)[k] for r in readings]))
              for k in agreement(readings[0], truth)},
           "denoiser_per_target": costs.denoiser / n, "backward_per_target": costs.backward / n,
           "seconds_per_target": costs.seconds / n, "timed_with_flop_counter": len(seeds) == 1,
           "gflop_per_inversion": flops / len(goals) / 1e9}
    for attribute in ATTRIBUTES:
        if attribute not in ENCODED[extractor_name]:
            row[f"{attribute}_variety"] = variety(readings, attribute)
    return row


def markdown(rows: list[dict], chance: dict) -> str:
    lines = ["| extractor | decoder | cosine (mean / min) | shape | colour | size | position (px) | clean | "
             "variety (not encoded) | UNet evals | extractor backward | GFLOP / inversion | s / target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        enc = ENCODED[r["extractor"]]
        acc = [f"**{r[f'{a}_acc']:.2f}**" if a in enc else f"{r[f'{a}_acc']:.2f}" for a in ATTRIBUTES]
        var = ", ".join(f"{a} {r[f'{a}_variety']:.2f}" for a in ATTRIBUTES if f"{a}_variety" in r) or "-"
        lines.append(f"| {r['extractor']} | {r['decoder']} | {r['cosine_mean']:.3f} / {r['cosine_min']:.3f} | "
                     f"{' | '.join(acc)} | {r['position_err_px']:.1f} | {r['clean_rate']:.2f} | {var} | "
                     f"{r['denoiser_per_target']:.0f} | {r['backward_per_target']:.0f} | "
                     f"{r['gflop_per_inversion']:.2f} | {r['seconds_per_target']:.2f} |")
    lines.append(f"| chance | | | {chance['shape_acc']:.2f} | {chance['colour_acc']:.2f} | "
                 f"{chance['size_class_acc']:.2f} | {chance['position_err_px']:.1f} | | | | | | |")
    return "\n".join(lines) + "\n"


def verdicts(row: dict, chance: dict) -> tuple[float, float | None]:
    """(mean agreement on the attributes the extractor encodes, mean distance to chance of the
    agreement on those it does not; None if it encodes them all)."""
    encoded = ENCODED[row["extractor"]]
    kept = np.mean([row[f"{a}_acc"] for a in ATTRIBUTES if a in encoded])
    free = [abs(row[f"{a}_acc"] - chance[f"{a}_acc"]) for a in ATTRIBUTES if a not in encoded]
    return float(kept), float(np.mean(free)) if free else None


def plot(rows: list[dict], path: Path, chance: dict) -> None:
    """The front: fidelity (mean cosine), agreement on the encoded attributes and distance to
    chance on the others, over FLOPs per inversion; one column per extractor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extractors = list(dict.fromkeys(r["extractor"] for r in rows))
    panels = (("cosine (mean)", lambda r: r["cosine_mean"]),
              ("agreement, encoded attributes", lambda r: verdicts(r, chance)[0]),
              ("|agreement - chance|, not encoded", lambda r: verdicts(r, chance)[1]))
    fig, axes = plt.subplots(len(panels), len(extractors), figsize=(4.2 * len(extractors), 3.2 * len(panels)),
                             squeeze=False)
    for column, name in enumerate(extractors):
        mine = [r for r in rows if r["extractor"] == name]
        for ax, (label, value) in zip(axes[:, column], panels):
            ax.set_visible(any(value(r) is not None for r in mine))
            for k, r in enumerate(mine):
                if value(r) is not None:
                    ax.scatter(r["gflop_per_inversion"], value(r), color=f"C{k % 10}",
                               marker="os^D"[k // 10 % 4], label=r["decoder"])
            ax.set_xscale("log")
            ax.set_xlabel("GFLOP per inversion (log)", fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(name, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.04 + 0.012 * len(labels) / 3, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(decoders: dict, extractors: dict, model, n: int, seeds: int, out: Path, target_seed: int,
        chance: dict) -> list[dict]:
    """Every decoder of `decoders` (name → factory(model, extractor, costs) → decode) on the
    same `n` targets (world seed `target_seed`) with the same `seeds`; writes compare.json, compare.md and
    compare.png into `out`; → the rows."""
    targets, truth = world.make_dataset(n, target_seed)
    oracle, rows = Oracle(), []
    for extractor_name, extractor in extractors.items():
        with torch.no_grad():
            goals = extractor(targets * 2 - 1)
        for name, factory in tqdm(decoders.items(), desc=f"compare on {extractor_name}", unit="decoder",
                                  dynamic_ncols=True):
            costs = Costs()
            decode = factory(CountingModel(model, costs), extractor, costs)
            row = measure(name, extractor_name, extractor, decode, costs, truth, goals, targets,
                          list(range(seeds)), oracle)
            rows.append(row)
            tqdm.write(f"{extractor_name} {name}: cosine {row['cosine_mean']:.3f} (min {row['cosine_min']:.3f}), "
                       f"{row['gflop_per_inversion']:.2f} GFLOP, {row['seconds_per_target']:.2f} s/target")
    (out / "compare.json").write_text(json.dumps({"n_targets": n, "target_seed": target_seed, "seeds": seeds, "chance": chance,
                                                  "rows": rows}, indent=1))
    (out / "compare.md").write_text(markdown(rows, chance))
    plot(rows, out / "compare.png", chance)
    return rows
