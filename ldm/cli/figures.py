"""`scripts/make_figure.py`: figures of finished decoding runs, as PNG and PDF.

  mosaic (the default): paper-style mosaic, one row per target: the target, then for each model
      a final | best column pair under the model's name, each image captioned with the cosine
      similarity and the squared distance of its feature to the target feature.
  curves: the squared distance and the cosine similarity from each run's log.txt against the
      timestep, noisiest to cleanest, several runs overlaid.

RUN arguments are run folders (an --optim_folder) or folders holding them (a multi-target
--optim_folder, a study's tree): the run folders under them are found recursively: the arguments
in the order given; under each, subfolders in the order of a multi-target run's index.json (the
--prompt order), else by name. The mosaic skips unfinished runs with a warning; the curves plot unfinished runs too.

--out decides the formats by its suffix: fig.png or fig.pdf writes that file, fig (no suffix)
writes both fig.png and fig.pdf.

    python scripts/make_figure.py outputs/toy_shape outputs/toy_colour --out outputs/mosaic
    python scripts/make_figure.py curves outputs/toy_shape outputs/toy_colour --out outputs/curves
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.errors import InputError
from ldm.figures import (IMAGE_COLUMNS, LOG_KINDS, FigureError, mosaic_layout, plot_log, read_log,
                         run_mosaic, save_image)
from ldm.scorelog import stop_message

COMMANDS = ("mosaic", "curves")
FORMATS = (".png", ".pdf")
MIN_CELL, MAX_CELL = 16, 2048


def output_paths(out: str) -> list[Path]:
    """fig.png / fig.pdf -> that file; fig -> fig.png and fig.pdf."""
    path = Path(out)
    if path.suffix.lower() in FORMATS:
        return [path]
    if path.suffix:
        raise FigureError(f"--out {out}: unknown format {path.suffix!r}; end it in .png or .pdf, or "
                          "give no suffix for both")
    return [path.with_name(path.name + suffix) for suffix in FORMATS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_figure.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="{mosaic,curves}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folders, or folders holding run folders (searched recursively)")
    common.add_argument("--out", required=True,
                        help="output file: .png or .pdf, or no suffix for both (fig -> fig.png, fig.pdf)")
    common.add_argument("--labels", nargs="+", metavar="LABEL",
                        help="one label per run, in the order the runs are found: the arguments', then "
                             "a multi-target run's index.json order or by name")

    mosaic = commands.add_parser("mosaic", parents=[common], help="paper-style mosaic (default)",
                                 description="Rows = targets; columns = the target, then final | best "
                                 "per model (the model name, or its --labels, heads each pair; runs "
                                 "that share a label share a column pair).")
    mosaic.add_argument("--cell", type=int, default=128, help="side of each image cell in pixels (128)")
    mosaic.add_argument("--images", nargs="+", choices=IMAGE_COLUMNS, default=list(IMAGE_COLUMNS),
                        help="which images to show per model (final best)")
    mosaic.add_argument("--sampler_numbers", action="store_true",
                        help="caption the sampler's numbers (its unclamped images, never saved) "
                             "instead of those of the saved PNGs (what a reader of the figure gets)")

    curves = commands.add_parser("curves", parents=[common], help="distance and cosine over timesteps",
                                 description="Squared distance (log scale when positive) and cosine "
                                 "similarity against the timestep, from each run's log.txt: the mean "
                                 "over the self-recurrences of each timestep, min-max shaded.")
    curves.add_argument("--kind", choices=LOG_KINDS, default="estimate",
                        help="which scored images to plot: estimate (decoded from the estimate of z_0 "
                             "before each guided step; default), guided (after it), backward, z_prev")
    curves.add_argument("--title", help="figure title (default: says what is plotted)")
    return parser


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _check_labels(labels, folders) -> None:
    if labels is not None and len(labels) != len(folders):
        listing = "\n".join(f"  {k + 1}. {f}" for k, f in enumerate(folders))
        raise FigureError(f"{len(labels)} --labels for {len(folders)} runs; give one per run, in "
                          f"this order:\n{listing}")


def make_mosaic(args) -> str:
    from ldm.run_folder import collect_runs   # the run folders' stack imports torch: not for --help
    paths = output_paths(args.out)
    if not MIN_CELL <= args.cell <= MAX_CELL:
        raise FigureError(f"--cell {args.cell}: the side of a cell is from {MIN_CELL} to {MAX_CELL:,} pixels")
    runs, skipped = collect_runs(args.runs)
    for message in skipped:
        _warn(message)
    _check_labels(args.labels, [run["folder"] for run in runs])
    reloaded = not args.sampler_numbers
    layout = mosaic_layout(runs, args.cell, labels=args.labels, images=args.images, reloaded=reloaded)
    image = run_mosaic(runs, args.cell, labels=args.labels, images=args.images, reloaded=reloaded)
    save_image(image, paths)
    return (f"mosaic of {len(runs)} run{'s' * (len(runs) > 1)}: {len(layout.rows)} row"
            f"{'s' * (len(layout.rows) > 1)} x {len(layout.groups)} model"
            f"{'s' * (len(layout.groups) > 1)} ({image.width}x{image.height} px) -> "
            + ", ".join(map(str, paths)))


def make_curves(args) -> str:
    from ldm.run_folder import find_run_folders
    paths = output_paths(args.out)
    folders = []
    for folder in find_run_folders(args.runs):
        if (folder / "log.txt").is_file():
            folders.append(folder)
        else:
            _warn(f"skipping {folder}: no log.txt")
    if not folders:
        raise FigureError("no log.txt in " + ", ".join(args.runs) + ": pass the folders of guided runs")
    _check_labels(args.labels, folders)
    labels = args.labels or _default_labels(folders)
    logs, errors = [], []
    for folder, label in zip(folders, labels):
        try:
            records = read_log(folder / "log.txt")
        except FigureError as err:
            errors.append(str(err))
            continue
        status = stop_message(folder / "log.txt")
        if status or not _finished(folder):
            _warn(f"{folder} is unfinished ({status or 'no finished metrics.json'}): plotting what its "
                  "log holds")
            label += " (unfinished)"
        logs.append((label, records))
    if not logs:
        raise FigureError("\n".join(errors))
    for message in errors:
        _warn(f"skipping: {message}")
    plot_log(logs, paths, kind=args.kind, title=args.title)
    return f"curves of {len(logs)} run{'s' * (len(logs) > 1)} ({args.kind}) -> " + ", ".join(map(str, paths))


def _finished(folder: Path) -> bool:
    from ldm.run_folder import RunFolderError, read_metrics
    try:
        return bool(read_metrics(folder).get("finished"))
    except RunFolderError:
        return False


def _default_labels(folders: list[Path]) -> list[str]:
    """Each folder's path below the folders' common parent (its name when there is one)."""
    if len(folders) == 1:
        return [folders[0].resolve().name]
    resolved = [f.resolve() for f in folders]
    common = Path(*_common_parts([f.parts for f in resolved]))
    return [str(f.relative_to(common)) if f != common else f.name for f in resolved]


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return tuple(common)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "mosaic")          # the mosaic is the default command
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:       # --help (0) or a usage error, already printed (2)
        return exit_.code
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("error: give run folders (and --out); see --help", file=sys.stderr)
        return 2
    try:
        summary = (make_mosaic if args.command == "mosaic" else make_curves)(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:   # --out in a folder that cannot be written, a full disk
        print(f"error: cannot write --out {args.out} ({err.strerror or err}): choose another --out",
              file=sys.stderr)
        return 2
    print(summary)
    return 0
