"""Make a mosaic (target | final | best, with cosine similarity and squared distance) from
finished runs, one row per run folder.

    python scripts/make_figure.py outputs/demo/toy_shape outputs/demo/toy_colour --out mosaic.png
"""
import argparse
import sys
from pathlib import Path

from ldm.figures import load_run, run_mosaic


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.json)")
    parser.add_argument("--out", required=True, help="output image (.png or .pdf)")
    parser.add_argument("--cell", type=int, default=128, help="side of each image cell in pixels")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(folder) for folder in args.runs]
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_mosaic(runs, cell=args.cell).save(out)
    print(f"mosaic of {len(runs)} runs -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
