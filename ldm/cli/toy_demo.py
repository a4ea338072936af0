"""`make demo` (scripts/toy_demo.py): decode one shipped toy target with each of the three toy
extractors (scripts/toy_guided.py's command line, in this process), write a mosaic
(target | final | best per extractor) and print the cosine similarities and the oracle's reading
of each image.

What to look for: the shape-only extractor's image tends to keep the target's shape and the
colour-only extractor's its colour; one sample shows one draw, and the toy benchmark
(docs/toy-world.md) measures the rates over many targets. A stopped demo continues with
`python scripts/toy_demo.py --resume` (finished extractors are kept).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ldm.cli import main as guided_main
from ldm.figures import run_mosaic
from ldm.run_folder import RunFolder, load_run
from ldm.toy import world
from ldm.toy.defaults import TOY_CKPT_HINT, TOY_DEFAULTS
from ldm.toy.names import TOY_NETS
from ldm.toy.oracle import Oracle

EXTRACTORS = tuple(TOY_NETS)


def read(oracle: Oracle, path: Path) -> str:
    r = oracle.read(world.load_image(str(path)))
    return f"{r.colour} {r.shape}, {r.size_class}, at ({r.cx:.0f}, {r.cy:.0f})" + ("" if r.clean else " (not clean)")


def decode(name: str, folder: Path, args, resume_hint: str) -> int:
    """One extractor's run: fresh, or, with --resume, continued (a finished one is kept)."""
    status, _ = RunFolder(folder).status()
    if args.resume and status == "finished":
        return 0
    again = ["--resume"] if args.resume and status == "interrupted" else ["--overwrite"]
    return guided_main({name: name}, defaults=TOY_DEFAULTS, ckpt_hint=TOY_CKPT_HINT,
                       resume_hint=resume_hint, argv=[
        "--extractor", name, "--prompt", args.prompt, "--optim_forward_guidance",
        "--optim_folder", str(folder), "--seed", str(args.seed), "--threads", str(args.threads),
        "--no_progress", *again])


def report(runs: list[dict], prompt: str, mosaic: Path, seconds: float) -> None:
    oracle = Oracle()
    print(f"\ntarget {prompt}: {read(oracle, Path(prompt))}")
    print(f"{'extractor':<12} {'cosine final':>12} {'cosine best':>12}   oracle reading of the final image")
    for run in runs:
        print(f"{run['extractor']:<12} {run['final']['reloaded_png']['cosine']:>12.4f} "
              f"{run['best']['reloaded_png']['cosine']:>12.4f}   {read(oracle, run['folder'] / 'out_img.png')}")
    print("(cosines of the saved PNGs, as a reader of the mosaic gets them; one sample each: the toy "
          "benchmark measures what each feature keeps over many targets, docs/toy-world.md)")
    print(f"\nmosaic (target | final | best per extractor): {mosaic}")
    print(f"demo finished in {seconds:.0f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default=TOY_DEFAULTS["prompt"], help="toy target image")
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue a stopped demo")
    parser.add_argument("--threads", type=int, default=TOY_DEFAULTS["threads"],
                        help="CPU threads of torch (default 1: the toy's models are small, and on a "
                             "shared machine one thread is much faster than two)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    hint = shlex.join(["python", "scripts/toy_demo.py", *[a for a in argv if a != "--resume"], "--resume"])
    out, start = Path(args.out), time.perf_counter()
    for name in tqdm(EXTRACTORS, desc="toy demo", unit="extractor", dynamic_ncols=True):
        code = decode(name, out / name, args, hint)
        if code:
            return code
    runs = [load_run(out / name) for name in EXTRACTORS]
    mosaic = out / "mosaic.png"
    run_mosaic(runs).save(mosaic)
    report(runs, args.prompt, mosaic, time.perf_counter() - start)
    return 0
