"""Benchmark of the decoder's central claim on the toy world, where the truth is known:
the decoded images keep exactly the attributes that the feature encodes.

For each toy extractor (shape-only, colour-only, all attributes) it decodes a fixed held-out set
of targets (one batch, one seed per target), and the same targets without guidance (same
seeds: the unguided baseline). It reports

- feature fidelity of the final and the best image: squared distance and cosine similarity to
  the target feature, guided vs unguided;
- attribute agreement between target and decoded image, read by the oracle: shape, colour and
  size-class accuracy and position error in pixels, against chance and the unguided baseline;

and writes `results.json`, `results.md` (the table) and `mosaic.png` into --out.

With --sweep it measures fidelity against cost instead: for every extractor of
--sweep_extractors and every (N, K) of --sweep_timesteps x --sweep_num_steps (N: the respaced
schedule's length, `--optim_timesteps`; K: `--optim_num_steps`, the early-emphasis boundary
staying timestep 900, so the early K covers the first 10 % of every schedule), it decodes the
same held-out targets with the same seeds and records the guided iterations, the wall time,
the final image's feature fidelity (mean and min cosine, the fraction of targets at cosine
>= 0.95, squared distance) and the oracle's attribute agreement, plus one unguided baseline per
extractor (K = 1, --timesteps). It writes `sweep.json` (after every setting: a rerun with the
same --out, --n and --seed skips the settings already measured, so an interrupted sweep
continues and a second grid adds to the first), `sweep.md` (the table) and `sweep.png`
(final cosine and encoded-attribute accuracy against iterations, one line per K).

    python scripts/toy_benchmark.py                 # the full benchmark (README table)
    python scripts/toy_benchmark.py --quick         # a small version, used by the test suite
    python scripts/toy_benchmark.py --sweep --n 16 --sweep_timesteps 1000 250 100 50 \
        --sweep_num_steps 1 "4 1" "8 2"             # fidelity against iterations
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ldm.objectives import FeatureDistance
from ldm.toy.extractors import TOY_EXTRACTORS
from ldm.toy.names import TOY_NETS
from ldm.decoders import DecoderOptions, make_decoding, sample_batch, to_unit_range
from ldm.models.diffusion.feature_guidance import GuidanceSettings
from ldm.models.loading import load_model
from ldm.toy import world
from ldm.toy.defaults import TOY_CKPT, TOY_CKPT_HINT, TOY_CONFIG, TOY_DEFAULTS
from ldm.toy.oracle import Oracle

HELD_OUT_SEED = 2026            # not a seed of any training set (ldm/toy, configs/toy)
TUNING_SEED = 2027              # targets that settings are chosen on (reported on HELD_OUT_SEED's)
ATTRIBUTES = ("shape", "colour", "size_class")


GUIDED = make_decoding(DecoderOptions())
# What each extractor was trained on (its feature encodes these; ldm/toy/nets.py).
# The sweep's verdicts read shape and colour.
ENCODED = {name: tuple(a for a in encodes if a in ("shape", "colour")) for name, encodes in TOY_NETS.items()}
COSINE_GOAL = 0.95              # a target counts as reached at final cosine >= this


def guidance_settings(guided: bool, timesteps: int, num_steps=None) -> GuidanceSettings:
    return GuidanceSettings(
        forward_guidance=guided, forward_guidance_wt=TOY_DEFAULTS["optim_forward_guidance_wt"],
        grad_clip_threshold=TOY_DEFAULTS["optim_grad_clip_threshold"],
        num_steps=tuple(num_steps or TOY_DEFAULTS["optim_num_steps"]),
        early_emp_end=TOY_DEFAULTS["optim_early_emp_end"], timesteps=timesteps)


def decode(model, extractor, targets: torch.Tensor, settings: GuidanceSettings, seed: int):
    """Decode a batch of target images' features; → dict of tensors (images in [0, 1])."""
    with torch.no_grad():
        goal = extractor(targets * 2 - 1)
    shape = (len(targets), model.channels, model.image_size, model.image_size)
    result = sample_batch(GUIDED, model, FeatureDistance(extractor, goal), shape,
                          [seed + b for b in range(len(targets))], settings=settings,
                          progress=sys.stderr.isatty())
    best = torch.stack([b.image for b in result.best])
    return {
        "final": to_unit_range(result.final_images), "best": to_unit_range(best),
        "final_distance": result.final_distance, "final_cosine": result.final_cosine,
        "best_distance": torch.tensor([b.distance for b in result.best]),
        "best_cosine": torch.tensor([b.cosine for b in result.best]),
        "iterations": result.iterations,
    }


def agreement(oracle: Oracle, images: torch.Tensor, truth: list[world.Attributes]) -> dict:
    """Oracle readings of decoded images vs the targets' true attributes."""
    readings = oracle.read_batch(images)
    out = {f"{a}_acc": float(np.mean([getattr(r, a) == getattr(t, a) for r, t in zip(readings, truth)]))
           for a in ATTRIBUTES}
    out["position_err_px"] = float(np.mean([math.hypot(r.cx - t.cx, r.cy - t.cy)
                                            for r, t in zip(readings, truth)]))
    out["clean_rate"] = float(np.mean([r.clean for r in readings]))
    return out


def chance_levels(truth: list[world.Attributes], seed: int) -> dict:
    """Agreement of an image drawn at random from the world (attributes independent of the target)."""
    rng = np.random.default_rng(seed)
    others = [world.sample_attributes(rng) for _ in range(20000)]
    pairs = list(zip(others, (truth * (len(others) // len(truth) + 1))[:len(others)]))
    out = {f"{a}_acc": float(np.mean([getattr(o, a) == getattr(t, a) for o, t in pairs])) for a in ATTRIBUTES}
    out["position_err_px"] = float(np.mean([math.hypot(o.cx - t.cx, o.cy - t.cy) for o, t in pairs]))
    return out


def summarise(decoded: dict, oracle: Oracle, truth) -> dict:
    out = {}
    for which in ("final", "best"):
        out[which] = {"squared_distance": float(decoded[f"{which}_distance"].mean()),
                      "cosine_mean": float(decoded[f"{which}_cosine"].mean()),
                      "cosine_min": float(decoded[f"{which}_cosine"].min()),
                      **agreement(oracle, decoded[which], truth)}
    return out


def markdown(results: dict) -> str:
    chance = results["chance"]
    lines = [
        f"Toy benchmark: {results['n_targets']} held-out targets per extractor, "
        f"{results['iterations']} guided iterations each ({results['settings']}); "
        f"{results['seconds']:.0f} s on {results['device']}.",
        "",
        "| extractor | run | image | cosine (mean / min) | sq. distance | shape acc | colour acc | size acc | position err (px) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results["extractors"].items():
        for run in ("guided", "unguided"):
            for which in ("final", "best"):
                r = rows[run][which]
                lines.append(f"| {name} | {run} | {which} | {r['cosine_mean']:.3f} / {r['cosine_min']:.3f} | "
                             f"{r['squared_distance']:.3g} | {r['shape_acc']:.2f} | {r['colour_acc']:.2f} | "
                             f"{r['size_class_acc']:.2f} | {r['position_err_px']:.1f} |")
    lines.append(f"| chance | | | | | {chance['shape_acc']:.2f} | {chance['colour_acc']:.2f} | "
                 f"{chance['size_class_acc']:.2f} | {chance['position_err_px']:.1f} |")
    return "\n".join(lines) + "\n"


def mosaic(targets: torch.Tensor, decoded: dict[str, dict], n: int, scale: int = 3) -> Image.Image:
    """Rows: targets; columns: target, then the final image of each extractor."""
    names = list(decoded)
    side, pad, head = 32 * scale, 4, 16
    canvas = Image.new("RGB", (pad + (len(names) + 1) * (side + pad), head + n * (side + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, title in enumerate(["target", *names]):
        draw.text((pad + c * (side + pad), 2), title, fill="black", font=font)
    for r in range(n):
        images = [targets[r], *[decoded[name]["final"][r] for name in names]]
        for c, image in enumerate(images):
            tile = Image.fromarray(world.to_uint8(image)).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (pad + c * (side + pad), head + r * (side + pad)))
    return canvas


# ---------------------------------------------------------------------------------------------
# --sweep: fidelity against iterations


def parse_num_steps(text: str) -> tuple[int, ...]:
    """"8 2", "8,2" or "1" → (8, 2) / (1,)."""
    try:
        values = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a K setting is one or more positive integers, got {text!r}")
    return values


def _key(row: dict) -> tuple:
    return row["extractor"], row["timesteps"], tuple(row["num_steps"]), row["guided"]


def _k_label(num_steps) -> str:
    return ",".join(map(str, num_steps))


def sweep_row(name: str, settings: GuidanceSettings, decoded: dict, seconds: float,
              oracle: Oracle, truth) -> dict:
    cos = decoded["final_cosine"]
    return {"extractor": name, "timesteps": settings.timesteps, "num_steps": list(settings.num_steps),
            "guided": settings.forward_guidance, "iterations": decoded["iterations"],
            "seconds": round(seconds, 1), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "cosine_median": float(cos.median()),
            "frac_cosine_goal": float((cos >= COSINE_GOAL).float().mean()),
            "squared_distance": float(decoded["final_distance"].mean()),
            "best_cosine_mean": float(decoded["best_cosine"].mean()),
            **agreement(oracle, decoded["final"], truth),
            "cosines": [round(float(c), 4) for c in cos]}


def encoded_accuracy(row: dict) -> float:
    """Mean oracle accuracy over the attributes that the row's extractor encodes."""
    return float(np.mean([row[f"{a}_acc"] for a in ENCODED[row["extractor"]]]))


def sweep_markdown(sweep: dict) -> str:
    chance = sweep["chance"]
    lines = [
        f"Toy respacing sweep: {sweep['n_targets']} held-out targets per extractor (seed "
        f"{sweep['held_out_seed']}), sampling seeds {sweep['seed']}..{sweep['seed'] + sweep['n_targets'] - 1}, "
        f"{sweep['fixed']}; cpu, {sweep['torch_threads']} thread(s), "
        f"{sweep['wall_seconds']:.0f} s of wall time in all. Final images; K = --optim_num_steps; "
        f"encoded attributes in bold; chance: shape {chance['shape_acc']:.2f}, colour {chance['colour_acc']:.2f}.",
        "",
        f"| extractor | N | K | iterations | seconds | cosine (mean / min) | cosine ≥ {COSINE_GOAL} | "
        "sq. distance | shape acc | colour acc | clean |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sweep_rows_sorted(sweep):
        enc = ENCODED[row["extractor"]]
        acc = {a: (f"**{row[f'{a}_acc']:.2f}**" if a in enc else f"{row[f'{a}_acc']:.2f}")
               for a in ("shape", "colour")}
        k = _k_label(row["num_steps"]) if row["guided"] else "unguided"
        lines.append(f"| {row['extractor']} | {row['timesteps']} | {k} | {row['iterations']} | "
                     f"{row['seconds']:.0f} | {row['cosine_mean']:.3f} / {row['cosine_min']:.3f} | "
                     f"{row['frac_cosine_goal']:.2f} | {row['squared_distance']:.3g} | {acc['shape']} | "
                     f"{acc['colour']} | {row['clean_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def sweep_rows_sorted(sweep: dict) -> list[dict]:
    order = {name: i for i, name in enumerate(TOY_EXTRACTORS)}
    return sorted(sweep["runs"], key=lambda r: (order.get(r["extractor"], 99), not r["guided"],
                                                -r["timesteps"], r["iterations"]))


def sweep_plot(sweep: dict, path: Path) -> None:
    """Final cosine (top) and encoded-attribute accuracy (bottom) against guided iterations,
    one line per K, one column per extractor; dotted: the unguided baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    names = [n for n in TOY_EXTRACTORS if any(r["extractor"] == n for r in sweep["runs"])]
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 5.6), squeeze=False, sharex=True)
    all_ks = sorted({tuple(r["num_steps"]) for r in sweep["runs"] if r["guided"]}, key=lambda k: (k[0], k[-1]))
    colour = {k: f"C{i}" for i, k in enumerate(all_ks)}      # the same colour for a K in every panel
    for c, name in enumerate(names):
        rows = [r for r in sweep["runs"] if r["extractor"] == name]
        ks = [k for k in all_ks if any(r["guided"] and tuple(r["num_steps"]) == k for r in rows)]
        for ax, metric in ((axes[0][c], lambda r: r["cosine_mean"]), (axes[1][c], encoded_accuracy)):
            for k in ks:
                line = sorted((r for r in rows if r["guided"] and tuple(r["num_steps"]) == k),
                              key=lambda r: r["iterations"])
                xs, ys = [r["iterations"] for r in line], [metric(r) for r in line]
                ax.plot(xs, ys, marker="o", color=colour[k], label=f"K = {_k_label(k)}")
                for r, x, y in zip(line, xs, ys):
                    ax.annotate(str(r["timesteps"]), (x, y), textcoords="offset points", xytext=(3, -9),
                                fontsize=6, color="grey")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        # The unguided baseline's cosine (about 0.3 to 0.6) would squash the top row: it is in the table.
        for r in rows:
            if not r["guided"]:
                axes[1][c].axhline(encoded_accuracy(r), color="grey", linestyle=":", linewidth=1,
                                   label=f"unguided (N = {r['timesteps']})")
        axes[0][c].axhline(COSINE_GOAL, color="grey", linestyle="--", linewidth=0.8)
        axes[0][c].set_ylabel("final cosine (mean; dashed: goal)", fontsize=8)
        axes[1][c].set_ylabel(f"{'+'.join(ENCODED[name])} accuracy (mean)", fontsize=8)
        for ax in (axes[0][c], axes[1][c]):
            ax.tick_params(labelsize=7)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][c].set_title(name, fontsize=9)
        axes[1][c].set_xlabel("guided iterations (grey: N)", fontsize=8)
        axes[0][c].legend(fontsize=6, loc="lower right")
    axes[1][0].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Toy world: fidelity against iterations ({sweep['n_targets']} targets, "
                 f"E = {TOY_DEFAULTS['optim_early_emp_end']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_sweep(sweep: dict, out: Path) -> str:
    sweep["runs"] = sweep_rows_sorted(sweep)
    (out / "sweep.json").write_text(json.dumps(sweep, indent=1))
    table = sweep_markdown(sweep)
    (out / "sweep.md").write_text(table)
    return table


def run_sweep(args, out: Path) -> int:
    start = time.perf_counter()
    grid = [(n, k) for k in args.sweep_num_steps for n in args.sweep_timesteps]
    fixed = (f"--optim_early_emp_end {TOY_DEFAULTS['optim_early_emp_end']} --optim_forward_guidance_wt "
             f"{TOY_DEFAULTS['optim_forward_guidance_wt']} --optim_grad_clip_threshold "
             f"{TOY_DEFAULTS['optim_grad_clip_threshold']}")
    sweep = {"n_targets": args.n, "seed": args.seed, "held_out_seed": HELD_OUT_SEED, "fixed": fixed,
             "device": "cpu", "torch_threads": torch.get_num_threads(), "cosine_goal": COSINE_GOAL,
             "encoded": {k: list(v) for k, v in ENCODED.items()}, "wall_seconds": 0.0, "runs": []}
    path = out / "sweep.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if (old.get("n_targets"), old.get("seed"), old.get("fixed")) != (args.n, args.seed, fixed):
            print(f"error: {path} holds a sweep with other targets or settings (n {old.get('n_targets')}, "
                  f"seed {old.get('seed')}, {old.get('fixed')}); use another --out", file=sys.stderr)
            return 2
        sweep["runs"], sweep["wall_seconds"] = old["runs"], old.get("wall_seconds", 0.0)
    done = {_key(r) for r in sweep["runs"]}

    model = load_model(TOY_CONFIG, TOY_CKPT, "cpu", missing_hint=TOY_CKPT_HINT)
    targets, truth = world.make_dataset(args.n, HELD_OUT_SEED)
    oracle = Oracle()
    sweep["chance"] = chance_levels(truth, HELD_OUT_SEED)
    plan = []
    for name in args.sweep_extractors:
        settings = [guidance_settings(True, n, k) for n, k in grid]
        settings.sort(key=lambda s: s.total_iterations(model.num_timesteps))   # cheap ones first
        settings.append(guidance_settings(False, args.timesteps, (1,)))
        plan += [(name, s) for s in settings]
    todo = [(name, s) for name, s in plan
            if (name, s.timesteps, s.num_steps, s.forward_guidance) not in done]
    total = sum(s.total_iterations(model.num_timesteps) for _, s in todo)
    print(f"sweep: {len(todo)} settings to run ({len(plan) - len(todo)} already in {path}), "
          f"{total} iterations of {args.n} targets", flush=True)
    extractors = {}
    for name, settings in tqdm(todo, desc="sweep", unit="setting", dynamic_ncols=True):
        extractor = extractors.setdefault(name, TOY_EXTRACTORS[name]())
        t0 = time.perf_counter()
        decoded = decode(model, extractor, targets, settings, args.seed)
        row = sweep_row(name, settings, decoded, time.perf_counter() - t0, oracle, truth)
        sweep["runs"].append(row)
        sweep["wall_seconds"] += time.perf_counter() - start
        start = time.perf_counter()
        write_sweep(sweep, out)
        k = _k_label(settings.num_steps) if settings.forward_guidance else "unguided"
        tqdm.write(f"{name} N={settings.timesteps} K={k}: {row['iterations']} iterations, {row['seconds']:.0f} s, "
                   f"cosine {row['cosine_mean']:.3f} (min {row['cosine_min']:.3f}, "
                   f"{row['frac_cosine_goal']:.2f} >= {COSINE_GOAL}), shape {row['shape_acc']:.2f}, "
                   f"colour {row['colour_acc']:.2f}")
    sweep["wall_seconds"] += time.perf_counter() - start
    table = write_sweep(sweep, out)
    sweep_plot(sweep, out / "sweep.png")
    print("\n" + table)
    print(f"sweep: {path}, {out / 'sweep.md'}, {out / 'sweep.png'}")
    return 0


TARGET_SEED_HELP = (f"world seed of the targets of --compare: {HELD_OUT_SEED} (held out, the docs' tables) "
                    f"or {TUNING_SEED} (the tuning set settings are chosen on)")
QUICK_DECODERS = ("guided", "fast preset", "featinv spatial", "hybrid")


def run_compare(args, out: Path) -> int:
    from ldm.benchmarks import compare
    from ldm.benchmarks.decoders import DECODERS, VARIANTS
    known = {**DECODERS, **VARIANTS}
    names = args.decoders or (list(QUICK_DECODERS) if args.quick else list(DECODERS))
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"error: no decoder {', '.join(map(repr, unknown))}; decoders: {', '.join(known)}", file=sys.stderr)
        return 2
    model = load_model(TOY_CONFIG, TOY_CKPT, "cpu", missing_hint=TOY_CKPT_HINT)
    _, truth = world.make_dataset(args.n, args.target_seed)
    extractors = args.compare_extractors or (["toy_all"] if args.quick else list(TOY_EXTRACTORS))
    chance = chance_levels(truth, args.target_seed)
    rows = compare.run({n: known[n] for n in names}, {n: TOY_EXTRACTORS[n]() for n in extractors},
                       model, args.n, args.seeds, out, args.target_seed, chance)
    print("\n" + compare.markdown(rows, chance))
    print(f"compare: {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50, help="held-out targets per extractor")
    parser.add_argument("--timesteps", type=int, default=TOY_DEFAULTS["optim_timesteps"],
                        help="respaced schedule length")
    parser.add_argument("--seed", type=int, default=0, help="first sampling seed (target b uses seed + b)")
    parser.add_argument("--out", default="outputs/toy_benchmark")
    parser.add_argument("--quick", action="store_true", help="12 targets, 50 timesteps (a few minutes); "
                        "with --compare: guided, fast preset, featinv spatial and hybrid on 6 toy_all targets, 1 seed")
    parser.add_argument("--sweep", action="store_true",
                        help="fidelity against iterations over --sweep_timesteps x --sweep_num_steps "
                             "(writes sweep.json, sweep.md, sweep.png; --timesteps: the unguided baseline's N)")
    parser.add_argument("--sweep_timesteps", type=int, nargs="+", default=[1000, 250, 100, 50], metavar="N",
                        help="schedule lengths (--optim_timesteps) of the sweep")
    parser.add_argument("--sweep_num_steps", type=parse_num_steps, nargs="+", metavar="K",
                        default=[(1,), (4, 1), (8, 2)],
                        help='self-recurrence settings (--optim_num_steps) of the sweep, each quoted: 1 "4 1" "8 2"')
    parser.add_argument("--sweep_extractors", nargs="+", choices=list(TOY_EXTRACTORS),
                        default=list(TOY_EXTRACTORS), help="extractors of the sweep")
    parser.add_argument("--compare", action="store_true",
                        help="every decoder (guided, its fast-path options, the trained decoders, the "
                             "hybrid) on the same targets and seeds: fidelity, attributes, variety, cost "
                             "(writes compare.json, compare.md, compare.png)")
    parser.add_argument("--decoders", nargs="+", help="decoders of --compare (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per target of --compare")
    parser.add_argument("--target_seed", type=int, default=HELD_OUT_SEED, help=TARGET_SEED_HELP)
    parser.add_argument("--compare_extractors", nargs="+", choices=list(TOY_EXTRACTORS),
                        help="extractors of --compare (default: all)")
    args = parser.parse_args(argv)
    if sum((args.quick and not args.compare, args.sweep, args.compare)) > 1:
        parser.error("--sweep and --compare do not combine with each other or with --quick")
    if args.quick and args.compare:    # CI: the decoders of QUICK_DECODERS on 6 toy_all targets, 1 seed
        args.n, args.seeds = 6, 1
    elif args.quick:
        args.n, args.timesteps = 12, 50
    default_out = {"sweep": "outputs/toy_sweep", "compare": "outputs/toy_compare"}
    mode = "sweep" if args.sweep else "compare" if args.compare else None
    out = Path(default_out[mode] if mode and args.out == parser.get_default("out") else args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.sweep or args.compare:
        return (run_sweep if args.sweep else run_compare)(args, out)
    start = time.perf_counter()

    model = load_model(TOY_CONFIG, TOY_CKPT, "cpu", missing_hint=TOY_CKPT_HINT)
    targets, truth = world.make_dataset(args.n, HELD_OUT_SEED)
    oracle = Oracle()
    results = {"n_targets": args.n, "timesteps": args.timesteps, "device": "cpu",
               "torch_threads": torch.get_num_threads(), "chance": chance_levels(truth, HELD_OUT_SEED),
               "extractors": {}}
    guided = guidance_settings(True, args.timesteps)
    unguided = guidance_settings(False, args.timesteps)
    finals = {}
    for name, cls in tqdm(TOY_EXTRACTORS.items(), desc="toy benchmark", unit="extractor", dynamic_ncols=True):
        extractor = cls()
        t0 = time.perf_counter()
        decoded = decode(model, extractor, targets, guided, args.seed)
        plain = decode(model, extractor, targets, unguided, args.seed)
        finals[name] = decoded
        results["extractors"][name] = {"guided": summarise(decoded, oracle, truth),
                                       "unguided": summarise(plain, oracle, truth),
                                       "seconds": time.perf_counter() - t0}
        results["iterations"] = decoded["iterations"]
        g = results["extractors"][name]["guided"]["final"]
        tqdm.write(f"{name}: cosine {g['cosine_mean']:.3f} (min {g['cosine_min']:.3f}), shape {g['shape_acc']:.2f}, "
                   f"colour {g['colour_acc']:.2f}, size {g['size_class_acc']:.2f}, position "
                   f"{g['position_err_px']:.1f} px ({time.perf_counter() - t0:.0f} s)")
    results["seconds"] = time.perf_counter() - start
    results["settings"] = (f"--optim_timesteps {args.timesteps} --optim_num_steps "
                           f"{' '.join(map(str, guided.num_steps))} --optim_early_emp_end {guided.early_emp_end} "
                           f"--optim_forward_guidance_wt {guided.forward_guidance_wt} "
                           f"--optim_grad_clip_threshold {guided.grad_clip_threshold}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "results.md").write_text(table)
    mosaic(targets, finals, min(8, args.n)).save(out / "mosaic.png")
    print("\n" + table)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'mosaic.png'}")
    return 0
