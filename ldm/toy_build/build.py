"""Train and evaluate the toy world's small models (CPU, fixed seeds): `scripts/train_toy.py`.

Stages (run in this order; pick some with ``--only``):

* ``extractors``  the target extractors ``extractor_{shape,colour,all}``;
* ``oracle``      the oracle's separate shape net ``oracle_shape`` (a second opinion);
* ``eval``        held-out accuracy, cross-attribute linear probes and the
                  oracle's accuracy on clean / degraded images -> ``metrics.json``;
* ``samples``     a handful of sample targets (``samples/``; ``data/toy/`` for the shipped build);
* ``ldm``         the toy latent diffusion model (first stage, then UNet) of
                  ``configs/toy/ldm.yaml`` -> ``ldm.safetensors`` (its trained scale_factor
                  is written into the build's copy of the config);
* ``ldm_eval``    unguided samples of it, read by the oracle: the fraction that
                  look like the world (one clean object) -> ``metrics.json``;
* ``taesd``       the tiny (TAESD-style) decoder distilled from the toy first
                  stage, to carry guidance gradients -> ``taesd_decoder.safetensors``;
* ``featinv``     FeatInv decoders of the three extractors (spatial map and pooled
                  baseline) on the frozen toy LDM -> ``featinv_*.safetensors``.

Everything goes to ``--out`` (default ``outputs/toy_models``, so that the shipped models are never
replaced by accident); ``--out models/toy`` rebuilds the shipped files themselves (and
``configs/toy/ldm.yaml``'s scale factor, and ``data/toy/``). A stage that needs an earlier
stage's model takes it from ``--out`` when it is there, else the shipped one. Architectures and
hyper-parameters come from ``configs/toy/nets.json`` and ``configs/toy/ldm.yaml``; logs go to
``<out>/train_log.txt``. New stages register themselves with ``@stage("name")`` and get a
:class:`Context`.

    python scripts/train_toy.py                                  # everything, into outputs/toy_models
    python scripts/train_toy.py --only eval --out models/toy     # re-evaluate the shipped weights
    python scripts/train_toy.py --only extractors --nets extractor_shape
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from ldm.paths import shipped
from ldm.toy import world
from ldm.toy.names import TOY_NETS
from ldm.toy.defaults import TOY_DEFAULTS
from ldm.toy.nets import SmallCNN, count_params, load_net, save_net
from ldm.toy.oracle import DEGRADATIONS, Oracle, degrade, score
from ldm.toy_build.nets_training import (attribute_sensitivity, batched, evaluate_heads, file_kib, probe_report,
                           set_threads, train_net)

STAGES: dict[str, Callable[["Context"], None]] = {}
EXTRACTORS = tuple(f"extractor_{name.removeprefix('toy_')}" for name in TOY_NETS)


def stage(name: str):
    """Register a stage function ``fn(ctx)`` under ``name`` (order = definition order)."""
    def deco(fn):
        STAGES[name] = fn
        return fn
    return deco


@dataclass
class Context:
    """What every stage gets: config, paths, logger, cached datasets, metrics."""

    config: dict
    out_dir: str
    log_path: str
    nets: list[str] | None = None
    steps_scale: float = 1.0
    _data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def log(self, msg: str) -> None:
        tqdm.write(msg)
        with open(self.log_path, "a") as f:
            f.write(msg + "\n")

    def data(self, split: str) -> tuple[torch.Tensor, list[world.Attributes], dict]:
        """``train`` / ``probe`` / ``test`` split: (images, attributes, label tensors), cached."""
        if split not in self._data:
            cfg = self.config["data"]
            t0 = time.time()
            x, attrs = world.make_dataset(cfg[f"{split}_n"], cfg[f"{split}_seed"])
            self._data[split] = (x, attrs, world.labels(attrs))
            self.log(f"data {split}: {len(x)} images (seed {cfg[f'{split}_seed']}) in {time.time() - t0:.1f}s")
        return self._data[split]

    def weights(self, name: str) -> str:
        """Where this build writes model `name`."""
        return os.path.join(self.out_dir, f"{name}.safetensors")

    def source(self, name: str) -> str:
        """Model `name` as a later stage reads it: this build's, else the shipped one."""
        built = self.weights(name)
        return built if os.path.exists(built) else str(shipped(f"models/toy/{name}.safetensors"))

    @property
    def ships(self) -> bool:
        """This build writes the shipped models (``--out models/toy``)."""
        return os.path.realpath(self.out_dir) == os.path.realpath(shipped("models/toy"))

    @property
    def ldm_config(self) -> str:
        """The toy LDM's config this build trains and reads: the shipped one, or a copy in --out
        (the ldm stage writes its trained scale factor into it)."""
        if self.ships:
            return str(shipped("configs/toy/ldm.yaml"))
        copy = os.path.join(self.out_dir, "ldm.yaml")
        if not os.path.exists(copy):
            shutil.copyfile(shipped("configs/toy/ldm.yaml"), copy)
        return copy

    def selected(self, names) -> list[str]:
        return [n for n in names if self.nets is None or n in self.nets]


def train_one(ctx: Context, name: str) -> None:
    """Train net ``name`` of the config on the train split and save it."""
    spec = ctx.config["nets"][name]
    x, _, lab = ctx.data("train")
    torch.manual_seed(spec["train"]["seed"])
    net = SmallCNN(**spec["arch"])
    kw = dict(spec["train"])
    kw["steps"] = max(1, int(round(kw["steps"] * ctx.steps_scale)))
    ctx.log(f"== {name}: {count_params(net)} params, {json.dumps(spec['arch'])}, {json.dumps(kw)}")
    t0 = time.time()
    history = train_net(net, x, lab, desc=name, log=ctx.log, **kw)
    secs = time.time() - t0
    path = ctx.weights(name)
    # no timings in the file, so that a re-run gives byte-identical weights
    save_net(net, path, extra={"name": name, "train": kw, "final_loss": history[-1]["loss"]})
    ctx.metrics.setdefault("training", {})[name] = {
        "seconds": round(secs, 1), "steps": kw["steps"], "final_loss": history[-1]["loss"],
        "params": count_params(net), "file_kib": file_kib(path)}
    ctx.log(f"== {name}: {secs:.1f}s, saved {path} ({file_kib(path)} KiB)")


@stage("extractors")
def train_extractors(ctx: Context) -> None:
    for name in ctx.selected(EXTRACTORS):
        train_one(ctx, name)


@stage("oracle")
def train_oracle(ctx: Context) -> None:
    for name in ctx.selected(("oracle_shape",)):
        train_one(ctx, name)


@stage("eval")
def evaluate(ctx: Context) -> None:
    """Extractor accuracies, probe leakage and oracle accuracy on held-out images."""
    xt, at, lt = ctx.data("test")
    xp, _, lp = ctx.data("probe")
    light = degrade(xt, noise=0.03, blur=0.5, seed=5)
    res = ctx.metrics.setdefault("extractors", {})
    for name in EXTRACTORS:
        net = load_net(ctx.source(name))
        t0 = time.time()
        entry = {"test_clean": evaluate_heads(net, xt, lt),
                 "test_noise0.03_blur0.5": evaluate_heads(net, light, lt),
                 "probes": probe_report(batched(net.features, xp), lp, batched(net.features, xt), lt),
                 "sensitivity": attribute_sensitivity(net, n=400, seed=11)}
        res[name] = entry
        ctx.log(f"eval {name} ({time.time() - t0:.1f}s): clean {fmt(entry['test_clean'])}")
        ctx.log(f"      degraded {fmt(entry['test_noise0.03_blur0.5'])}")
        for attr, p in entry["probes"].items():
            ctx.log(f"      probe {attr:<10} {fmt(p)}")
        for kind, sens in entry["sensitivity"].items():
            ctx.log(f"      change one attribute, {kind} feature distance / random pairs: {fmt(sens)}")
    oracle = Oracle(load_net(ctx.source("oracle_shape")))
    ores = ctx.metrics["oracle"] = {}
    for dname, kw in DEGRADATIONS.items():
        t0 = time.time()
        s = score(oracle.read_batch(degrade(xt, seed=7, **kw)), at)
        ores[dname] = s
        ctx.log(f"oracle {dname:<26} ({time.time() - t0:.1f}s) {fmt(s)}")


@stage("samples")
def write_samples(ctx: Context) -> None:
    path = str(shipped("data/toy")) if ctx.ships else os.path.join(ctx.out_dir, "samples")
    attrs = world.save_samples(path, n=8, seed=0)
    ctx.log(f"samples: wrote {len(attrs)} targets + attributes.json to {path}")


@stage("ldm")
def train_ldm(ctx: Context) -> None:
    """The toy latent diffusion model (configs/toy/ldm.yaml): first stage, then UNet."""
    from ldm.toy_build.ldm_training import train_toy_ldm

    ctx.metrics["ldm"] = train_toy_ldm(ctx.ldm_config, ctx.weights("ldm"), ctx.log)


@stage("ldm_eval")
def evaluate_ldm(ctx: Context) -> None:
    """Unguided samples of the toy LDM, read by the oracle: do they look like the world?"""
    from ldm.models.loading import load_model
    from torchvision.utils import save_image

    from ldm.toy_build.ldm_training import sample_unguided

    n = ctx.config.get("ldm_eval", {}).get("n", 500)
    model = load_model(ctx.ldm_config, ctx.source("ldm"))
    t0 = time.time()
    samples = sample_unguided(model, n, seed=ctx.config.get("ldm_eval", {}).get("seed", 5))
    readings = Oracle().read_batch(samples)
    counts = lambda attr, values: {v: sum(getattr(r, attr) == v for r in readings if r.clean) for v in values}
    result = {"n": n, "clean_rate": sum(r.clean for r in readings) / n,
              "shapes": counts("shape", world.SHAPES), "colours": counts("colour", world.COLOUR_NAMES),
              "seconds": round(time.time() - t0, 1)}
    ctx.metrics["ldm_samples"] = result
    ctx.log(f"ldm samples: {fmt(result)}")
    save_image(samples[:64], os.path.join(ctx.out_dir, "ldm_samples.png"), nrow=8, padding=1)


@stage("taesd")
def train_taesd(ctx: Context) -> None:
    """The tiny TAESD-style decoder distilled from the toy first stage (ldm/toy_build/taesd_training.py)."""
    from ldm.toy_build.taesd_training import DEFAULT_STEPS, train

    steps = max(4, round(DEFAULT_STEPS * ctx.steps_scale))
    ctx.metrics["taesd"] = train(ctx.weights("taesd_decoder"), steps=steps,
                                 ldm_ckpt=ctx.source("ldm"), log=ctx.log)


@stage("featinv")
def train_featinv(ctx: Context) -> None:
    """FeatInv decoders (ControlNets on the frozen toy LDM) of the three extractors' spatial
    map and pooled vector, measured on held-out targets (ldm/toy_build/featinv_decoders.py)."""
    from ldm.toy_build.featinv_decoders import train_toy_decoders

    ctx.metrics["featinv"] = train_toy_decoders(ctx.out_dir, ctx.log)


def fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(STAGES), default=list(STAGES),
                    help="stages to run (default: all, in order)")
    ap.add_argument("--nets", nargs="+", default=None, help="restrict training to these net names")
    ap.add_argument("--config", default=str(shipped("configs/toy/nets.json")))
    ap.add_argument("--out", default="outputs/toy_models",
                    help="where the models, metrics.json and train_log.txt go (models/toy: the shipped files)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every net's steps (quick runs)")
    ap.add_argument("--threads", type=int, default=TOY_DEFAULTS["threads"],
                    help="torch threads (default 1: far faster than 2 when other jobs share the 2 cores)")
    args = ap.parse_args(argv)

    set_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    with open(args.config) as f:
        config = json.load(f)
    ctx = Context(config, args.out, os.path.join(args.out, "train_log.txt"), args.nets, args.steps_scale)
    metrics_path = os.path.join(args.out, "metrics.json")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            ctx.metrics = json.load(f)
    ctx.log(f"### train_toy {time.strftime('%Y-%m-%d %H:%M:%S')} stages={args.only} nets={args.nets} "
            f"threads={args.threads} torch={torch.__version__}")
    t0 = time.time()
    for name in STAGES:
        if name in args.only:
            ts = time.time()
            STAGES[name](ctx)
            ctx.metrics.setdefault("stage_seconds", {})[name] = round(time.time() - ts, 1)
            with open(metrics_path, "w") as f:
                json.dump(ctx.metrics, f, indent=1)
    ctx.log(f"### done in {time.time() - t0:.1f}s")
