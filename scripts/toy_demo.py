"""`make demo`: decode one shipped toy target with each of the three toy extractors
(scripts/toy_guided.py's command line, in this process), write a mosaic
(target | final | best per extractor) and print the cosine similarities.

What to look for: the shape-only extractor's images keep the target's shape but not its colour,
the colour-only extractor's keep the colour but not the shape, the all-attribute extractor's
keep both. The oracle's reading of each image is printed too.
"""
import argparse
import sys
import time
from pathlib import Path

from ldm.extractors.toy import TOY_EXTRACTORS
from ldm.figures import load_run, run_mosaic
from ldm.guided_run import main as guided_main
from ldm.toy import world
from ldm.toy.defaults import TOY_CKPT_HINT, TOY_DEFAULTS
from ldm.toy.oracle import Oracle


def read(oracle: Oracle, path: Path) -> str:
    r = oracle.read(world.load_image(str(path)))
    return f"{r.colour} {r.shape}, {r.size_class}, at ({r.cx:.0f}, {r.cy:.0f})" + ("" if r.clean else " (not clean)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default=TOY_DEFAULTS["prompt"], help="toy target image")
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    folders = []
    for name in TOY_EXTRACTORS:
        folder = out / name
        code = guided_main(TOY_EXTRACTORS, defaults=TOY_DEFAULTS, ckpt_hint=TOY_CKPT_HINT, argv=[
            "--extractor", name, "--prompt", args.prompt, "--optim_forward_guidance",
            "--optim_folder", str(folder), "--seed", str(args.seed), "--overwrite", "--no_progress"])
        if code:
            return code
        folders.append(folder)
    runs = [load_run(f) for f in folders]
    mosaic = out / "mosaic.png"
    run_mosaic(runs).save(mosaic)

    oracle = Oracle()
    print(f"\ntarget {args.prompt}: {read(oracle, Path(args.prompt))}")
    print(f"{'extractor':<12} {'cosine final':>12} {'cosine best':>12}   oracle reading of the final image")
    for run in runs:
        print(f"{run['extractor']:<12} {run['final']['cosine']:>12.4f} {run['best']['cosine']:>12.4f}   "
              f"{read(oracle, run['folder'] / 'out_img.png')}")
    print(f"\nmosaic (target | final | best per extractor): {mosaic}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
