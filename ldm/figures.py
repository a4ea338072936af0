"""Figures of guided-decoding runs (`scripts/make_figure.py`).

- **Finding runs**: `find_run_folders` walks run folders or parent folders (an `--optim_folder`
  of a multi-target run, a sharded study's tree) and returns every folder that holds a
  `metrics.json` or a `log.txt`; `collect_runs` loads the finished ones.
- **Mosaics** (`run_mosaic`, paper style): one row per target, the target in the first column,
  then for each model (or label) a final | best column pair under the model's name, each image
  captioned "cos 0.987 / d 12.3" (cosine similarity and squared distance of its feature to the
  target feature).
- **Score curves** (`parse_log`, `plot_log`): the squared distance and the cosine similarity
  logged at each timestep, from the noisiest to the cleanest, one or several runs overlaid.

Bad input (a missing path, no finished run, an unreadable metrics.json, a log without scores)
raises `FigureError`, whose message names the problem and the fix.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

IMAGE_COLUMNS = ("final", "best")
LOG_KINDS = ("estimate", "guided", "backward", "z_prev")
PDF_DPI = 100

_BACKGROUND = "white"
_PLACEHOLDER = (208, 208, 208)
_TEXT_CELL = (240, 240, 240)


class FigureError(ValueError):
    """Bad input for a figure: the message names the problem and the fix."""


# --------------------------------------------------------------------------- finding runs

def find_run_folders(paths: Iterable[str | Path]) -> list[Path]:
    """Every folder holding a `metrics.json` or a `log.txt` at or under each path: the paths in
    the order given; under each, subfolders in the order of the folder's `index.json` (a
    multi-target run lists its targets in --prompt order) and by name otherwise. A path may also
    name a run's `metrics.json` or `log.txt` file."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FigureError(f"{path} does not exist: pass run folders (each with metrics.json and "
                              "log.txt) or folders holding them")
        if path.is_file():
            if path.name not in ("metrics.json", "log.txt"):
                raise FigureError(f"{path} is a file, not a run folder: pass the folder holding "
                                  "metrics.json and log.txt (or a folder of such folders)")
            folders = [path.parent]
        else:
            folders = _walk(path)
            if not folders:
                raise FigureError(f"no run folder under {path}: a run folder holds metrics.json and "
                                  "log.txt (the --optim_folder of a guided run)")
        found.extend(f for f in folders if f not in found)
    return found


def _is_run_folder(folder: Path) -> bool:
    return (folder / "metrics.json").is_file() or (folder / "log.txt").is_file()


def _walk(folder: Path) -> list[Path]:
    """Run folders at or under `folder` (symbolic links to folders are not followed)."""
    found = [folder] if _is_run_folder(folder) else []
    try:
        children = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError as err:
        raise FigureError(f"cannot list {folder} ({err.strerror or err}): check its permissions") from None
    order = _index_order(folder)
    children.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    for child in children:
        found.extend(_walk(child))
    return found


def _index_order(folder: Path) -> dict[str, int]:
    """Subfolder name -> position in the folder's index.json (empty without a readable one)."""
    try:
        targets = json.loads((folder / "index.json").read_text(encoding="utf-8"))["targets"]
        return {str(t["folder"]): k for k, t in enumerate(targets)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def load_run(folder: str | Path) -> dict:
    """metrics.json of a finished run, with `folder` added. Raises FigureError when the folder
    holds no metrics.json, an unreadable one, or an unfinished run."""
    folder = Path(folder)
    run = _read_metrics(folder)
    if not run.get("finished"):
        raise FigureError(f"{folder} holds an unfinished run: {_unfinished_hint(run)}")
    for key in ("target", "extractor", "final"):
        if key not in run:
            raise FigureError(f"{folder / 'metrics.json'} has no {key!r} entry: it was not written by a "
                              "guided run of this repository (rerun it, or remove the folder)")
    run["folder"] = folder
    return run


def _read_metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    if not path.is_file():
        raise FigureError(f"{folder} holds no metrics.json: the run is still going, or was killed "
                          "before writing it (rerun it, or resume it with --resume)")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FigureError(f"cannot read {path} ({err}): rerun that run with --overwrite, or remove "
                          "the folder") from None
    if not isinstance(run, dict):
        raise FigureError(f"{path} is not a run's metrics (a JSON object expected): rerun that run "
                          "with --overwrite, or remove the folder")
    return run


def _unfinished_hint(run: dict) -> str:
    reason = (run.get("stopped") or {}).get("reason")
    command = run.get("resume_command")
    why = f"stopped by {reason}" if reason else "not finished"
    return f"{why}; finish it with `{command}`" if command else f"{why}; finish it with --resume"


def collect_runs(paths: Iterable[str | Path]) -> tuple[list[dict], list[str]]:
    """The finished runs at or under `paths` (see `find_run_folders`), and one warning per run
    folder skipped because it is unfinished. Raises FigureError when none is finished or a
    metrics.json cannot be read."""
    runs, skipped = [], []
    folders = find_run_folders(paths)
    for folder in folders:
        if not (folder / "metrics.json").is_file():
            skipped.append(f"skipping {folder}: no metrics.json yet (the run is still going, or was "
                           "killed; resume it with --resume)")
            continue
        metrics = _read_metrics(folder)
        if not metrics.get("finished"):
            skipped.append(f"skipping unfinished run {folder}: {_unfinished_hint(metrics)}")
            continue
        runs.append(load_run(folder))
    if not runs:
        raise FigureError("no finished run among " + ", ".join(map(str, folders))
                          + ": finish the runs first (--resume)")
    return runs, skipped


# --------------------------------------------------------------------------- mosaics

@dataclass
class MosaicLayout:
    """Where everything of a mosaic goes. `rows[r][g]` is the run of group (label) `groups[g]`
    in row r, or None; `targets[r]` is the run whose target row r shows."""
    cell: int
    pad: int
    groups: list[str]
    images: tuple[str, ...]
    targets: list[dict]
    rows: list[list[dict | None]]
    font_size: int
    caption_lines: int
    header_height: int = field(init=False)
    row_height: int = field(init=False)
    group_gap: int = field(init=False)

    def __post_init__(self):
        line = _line_height(self.font_size)
        self.header_height = self.pad + 2 * line + self.pad
        self.row_height = self.cell + self.caption_lines * line + 2 * self.pad
        self.group_gap = 3 * self.pad

    @property
    def n_columns(self) -> int:
        return 1 + len(self.groups) * len(self.images)

    @property
    def group_width(self) -> int:
        """Width of one model's columns (final | best)."""
        return len(self.images) * (self.cell + self.pad) - self.pad

    @property
    def size(self) -> tuple[int, int]:
        width = 2 * self.pad + self.cell + len(self.groups) * (self.group_gap + self.group_width)
        return width, self.header_height + len(self.rows) * self.row_height

    def box(self, row: int, column: int) -> tuple[int, int]:
        """Top-left pixel of the image cell in `row`, `column` (0 = target)."""
        left = self.pad
        if column:
            g, i = divmod(column - 1, len(self.images))
            left += self.cell + (g + 1) * self.group_gap + g * self.group_width + i * (self.cell + self.pad)
        return left, self.header_height + row * self.row_height + self.pad


def target_key(run: dict) -> tuple[str, str]:
    """What identifies a run's target across runs: its kind and source, an image by its file
    (so relative and absolute paths to the same image match)."""
    target = run["target"]
    kind, source = str(target.get("kind")), str(target.get("source", ""))
    if kind == "image":
        found = _find_target_image(source, Path(run.get("folder", ".")))
        source = str(found.resolve()) if found else os.path.normpath(source)
    elif kind == "features":
        source = os.path.normpath(source)
    return kind, source


def mosaic_layout(runs: Sequence[dict], cell: int = 128, pad: int = 6,
                  labels: Sequence[str] | None = None, images: Sequence[str] = IMAGE_COLUMNS,
                  reloaded: bool = False) -> MosaicLayout:
    """Group `runs` into rows (one per target, in order of first appearance) and column groups
    (one per label; labels default to the extractor names). When a target has several runs
    with the same label (other seeds or settings), it gets one row per run."""
    if not runs:
        raise FigureError("no runs to draw")
    if cell < 16:
        raise FigureError(f"--cell {cell} is too small to draw: use 16 pixels or more")
    images = tuple(images)
    if not images or any(i not in IMAGE_COLUMNS for i in images) or len(set(images)) != len(images):
        raise FigureError(f"images {images} must be 'final', 'best' or both")
    if labels is None:
        labels = [run["extractor"] for run in runs]
    elif len(labels) != len(runs):
        raise FigureError(f"{len(labels)} labels for {len(runs)} runs: give one label per run, in "
                          "the order the runs are listed")
    groups = list(dict.fromkeys(labels))
    by_target: dict[tuple, dict[str, list[dict]]] = {}
    for run, label in zip(runs, labels):
        by_target.setdefault(target_key(run), defaultdict(list))[label].append(run)
    targets, rows = [], []
    for per_label in by_target.values():
        first = next(iter(per_label.values()))[0]
        for r in range(max(len(v) for v in per_label.values())):
            targets.append(first)
            rows.append([per_label[g][r] if r < len(per_label.get(g, ())) else None for g in groups])
    font_size = max(9, min(22, cell // 10))
    captions = [_caption(run.get(name), reloaded) for run in runs for name in images]
    widest = max(_font(font_size).getlength(text) for text in captions)
    caption_lines = 1 if widest <= cell else 2      # else "cos ..." over "d ..."
    return MosaicLayout(cell, pad, groups, images, targets, rows, font_size, caption_lines)


def run_mosaic(runs: Sequence[dict], cell: int = 128, pad: int = 6,
               labels: Sequence[str] | None = None, images: Sequence[str] = IMAGE_COLUMNS,
               reloaded: bool = False) -> Image.Image:
    """The paper-style mosaic of finished runs (`load_run` / `collect_runs` dicts): rows =
    targets; columns = the target, then final | best per model under the model's name, each
    captioned with the cosine similarity and squared distance to the target. `reloaded` uses
    the numbers re-measured on the saved PNGs (metrics.json's `reloaded_png`)."""
    layout = mosaic_layout(runs, cell, pad, labels, images, reloaded)
    canvas = Image.new("RGB", layout.size, _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, bold = _font(layout.font_size), _font(layout.font_size, bold=True)
    line = _line_height(layout.font_size)
    n = len(layout.images)

    # Header: the model name over each group, the image kind over each column.
    x, _ = layout.box(0, 0)
    _centered(draw, "target", x, cell, pad + line, font)
    for g, group in enumerate(layout.groups):
        left, _ = layout.box(0, 1 + g * n)
        width = layout.group_width
        _centered(draw, _fit_text(group, width, bold), left, width, pad, bold)
        for i, name in enumerate(layout.images):
            _centered(draw, name, left + i * (cell + pad), cell, pad + line, font)

    for r, (target, row) in enumerate(zip(layout.targets, layout.rows)):
        left, top = layout.box(r, 0)
        cell_image, caption = _target_cell(target, cell, font)
        canvas.paste(cell_image, (left, top))
        if caption:
            _centered(draw, _fit_text(caption, cell, font), left, cell, top + cell + 2, font)
        for g, run in enumerate(row):
            for i, name in enumerate(layout.images):
                left, top = layout.box(r, 1 + g * n + i)
                cell_image, entry = _image_cell(run, name, cell, font)
                canvas.paste(cell_image, (left, top))
                if entry:
                    text = _caption(entry, reloaded)
                    lines = [text] if layout.caption_lines == 1 else text.split(" / ")
                    for k, part in enumerate(lines):
                        _centered(draw, part, left, cell, top + cell + 2 + k * line, font)
    return canvas


def save_image(image: Image.Image, paths: Sequence[Path]) -> list[Path]:
    """Save as PNG and/or PDF (by suffix; the PDF page at PDF_DPI)."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".pdf":
            image.save(path, "PDF", resolution=PDF_DPI)
        else:
            image.save(path, "PNG")
    return list(paths)


def _caption(entry: dict | None, reloaded: bool = False) -> str:
    """"cos 0.987 / d 12.3" for a metrics.json image entry (its `reloaded_png` numbers with
    `reloaded`)."""
    numbers = (entry or {}).get("reloaded_png") if reloaded else entry
    if not numbers:
        return "not measured"
    return f"cos {_number(numbers.get('cosine'), 3)} / d {_number(numbers.get('squared_distance'))}"


def _number(value, decimals: int | None = None) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if decimals is not None:
        return f"{value:.{decimals}f}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _target_cell(run: dict, cell: int, font) -> tuple[Image.Image, str | None]:
    """The target's cell and the caption under it (the file name of an image target)."""
    kind, source = run["target"].get("kind"), str(run["target"].get("source", ""))
    if kind == "image":
        path = _find_target_image(source, run["folder"])
        if path is None:
            return _placeholder(cell, f"target image not found:\n{source}", font), None
        try:
            with Image.open(path) as image:
                return _fit(image, cell), Path(source).stem
        except OSError:
            return _placeholder(cell, f"target image unreadable: {source}", font), None
    prefix = {"text": "", "features": "features: ", "expression": "expression: "}.get(kind, f"{kind}: ")
    text = f"\u201c{source}\u201d" if kind == "text" else prefix + source
    return _text_block(cell, text, font, _TEXT_CELL), None


def _find_target_image(source: str, folder: Path) -> Path | None:
    """The target image as recorded (relative to the current folder), else relative to the run
    folder or one of its parents (runs started from the repository root, read from elsewhere)."""
    path = Path(source)
    if path.is_file() or path.is_absolute():
        return path if path.is_file() else None
    for parent in [folder, *Path(folder).resolve().parents]:
        if (parent / path).is_file():
            return parent / path
    return None


def _image_cell(run: dict | None, name: str, cell: int, font) -> tuple[Image.Image, dict | None]:
    if run is None:
        return _placeholder(cell, "no run", font), None
    entry = run.get(name)
    if not entry:
        return _placeholder(cell, f"no {name} image", font), None
    path = Path(run["folder"]) / entry["file"]
    try:
        with Image.open(path) as image:
            return _fit(image, cell), entry
    except OSError:
        return _placeholder(cell, f"missing: {entry['file']}", font), entry


def _fit(image: Image.Image, size: int) -> Image.Image:
    """The image in a size x size square (nearest-neighbour when enlarging small images)."""
    image = image.convert("RGB")
    scale = size / max(image.size)
    resample = Image.NEAREST if scale >= 1 else Image.BICUBIC
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    square = Image.new("RGB", (size, size), _BACKGROUND)
    square.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return square


def _placeholder(cell: int, message: str, font) -> Image.Image:
    return _text_block(cell, message, font, _PLACEHOLDER, center=True)


def _text_block(cell: int, text: str, font, background, center: bool = False) -> Image.Image:
    """A cell of wrapped text (cut with an ellipsis when it does not fit)."""
    image = Image.new("RGB", (cell, cell), background)
    draw = ImageDraw.Draw(image)
    margin = max(3, cell // 24)
    line = _line_height(font.size)
    lines = _wrap(text, cell - 2 * margin, font)
    fit = max(1, (cell - 2 * margin) // line)
    if len(lines) > fit:
        lines = lines[:fit]
        lines[-1] = _fit_text(lines[-1] + "\u2026", cell - 2 * margin, font)
    top = (cell - len(lines) * line) // 2 if center else margin
    for k, text_line in enumerate(lines):
        if center:
            _centered(draw, text_line, 0, cell, top + k * line, font)
        else:
            draw.text((margin, top + k * line), text_line, fill="black", font=font)
    return image


def _wrap(text: str, width: int, font) -> list[str]:
    """Greedy word wrap to `width` pixels; over-long words are cut into pieces."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            while len(word) > 1 and font.getlength(word) > width:
                cut = 1
                while cut < len(word) and font.getlength(word[:cut + 1]) <= width:
                    cut += 1
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            candidate = f"{line} {word}".strip()
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _fit_text(text: str, width: int, font) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "\u2026") > width:
        text = text[:-1]
    return text + "\u2026"


def _centered(draw: ImageDraw.ImageDraw, text: str, left: int, width: int, top: int, font) -> None:
    draw.text((left + (width - font.getlength(text)) / 2, top), text, fill="black", font=font)


@lru_cache(maxsize=None)
def _font(size: int, bold: bool = False):
    """DejaVu Sans (shipped with matplotlib, so mosaics and curves share a font)."""
    from matplotlib import font_manager

    props = font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal")
    try:
        return ImageFont.truetype(font_manager.findfont(props, fallback_to_default=True), size)
    except OSError:
        return ImageFont.load_default(size)


def _line_height(size: int) -> int:
    return round(size * 1.3)


# --------------------------------------------------------------------------- log curves

_SCORE = re.compile(
    r"^(?P<t>-?\d+)th timestep, (?P<rec>\d+(?:\.\d+)?)th self-recurrence(?P<zprev> \(z_prev\))?"
    r"(?:, (?P<bk>-?\d+)th backward iteration)?"
    r" -> xy_dists:(?P<d>[^,\s]+)(?:, xy_cossim:(?P<c>[^,\s]+))?\s*$")
_FINAL = re.compile(r"^-1th timestep \(FINAL\) -> xy_dists:(?P<d>[^,\s]+)(?:, xy_cossim:(?P<c>[^,\s]+))?\s*$")


@dataclass(frozen=True)
class LogRecord:
    """One scored image of a log.txt. kind: "estimate" (j: the image decoded from the
    pre-guidance estimate of z_0; forward guidance differentiates its score), "guided"
    (j + 0.5: after the guided step), "backward" (j + 0.7 / j + 0.9: backward guidance,
    iteration `backward_iter`), "z_prev" (a z_prev candidate) or "final" (t = -1).
    `cosine` is None in logs of runs that did not log it."""
    t: int
    rec: float | None
    kind: str
    distance: float
    cosine: float | None
    backward_iter: int | None = None


def parse_log(path: str | Path) -> list[LogRecord]:
    """The scored images of a run's log.txt, in order. Other lines ("!!! Found a better ...",
    "Elapsed time", "Run options", "Interrupted by ...", "Numerical fault: ...") carry no score
    and are skipped. Raises FigureError when the file cannot be read or holds no score line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise FigureError(f"cannot read {path} ({err.strerror or err}): pass a run folder with a "
                          "readable log.txt") from None
    records = []
    for line in text.splitlines():
        if (m := _SCORE.match(line)) is not None:
            rec = float(m["rec"])
            if m["zprev"]:
                kind = "z_prev"
            elif m["bk"] is not None or rec % 1 not in (0.0, 0.5):
                kind = "backward"
            else:
                kind = "estimate" if rec % 1 == 0 else "guided"
            records.append(LogRecord(int(m["t"]), rec, kind, float(m["d"]), _float(m["c"]),
                                     int(m["bk"]) if m["bk"] is not None else None))
        elif (m := _FINAL.match(line)) is not None:
            records.append(LogRecord(-1, None, "final", float(m["d"]), _float(m["c"])))
    if not records:
        raise FigureError(f"{path} has no score lines (\"... self-recurrence -> xy_dists:...\"): it is "
                          "not the log.txt of a guided run, or the run stopped before scoring anything")
    return records


def _float(text: str | None) -> float | None:
    return None if text is None else float(text)


def log_status(path: str | Path) -> str | None:
    """"Interrupted by ..." / "Numerical fault: ..." when the log ends that way, else None."""
    last = None
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(("Interrupted by ", "Numerical fault: ")):
            last = line.strip()
        elif _SCORE.match(line) or _FINAL.match(line):
            last = None      # resumed after the stop: the run went on
    return last


def per_timestep(records: Sequence[LogRecord], kind: str) -> tuple[list[int], dict[str, list]]:
    """Timesteps (noisiest first) and, per timestep, the number of records of `kind` ("count")
    and the mean / min / max of their distances and cosine similarities ("cosine_mean" entries
    are None where the log has no cosine)."""
    groups: dict[int, list[LogRecord]] = {}
    for record in records:
        if record.kind == kind:
            groups.setdefault(record.t, []).append(record)
    ts = sorted(groups, reverse=True)
    stats: dict[str, list] = defaultdict(list)
    for t in ts:
        stats["count"].append(len(groups[t]))
        for name in ("distance", "cosine"):
            values = [getattr(r, name) for r in groups[t] if getattr(r, name) is not None]
            finite = [v for v in values if math.isfinite(v)]
            mean = sum(finite) / len(finite) if finite else (math.nan if values else None)
            stats[f"{name}_mean"].append(mean)
            stats[f"{name}_min"].append(min(finite) if finite else math.nan)
            stats[f"{name}_max"].append(max(finite) if finite else math.nan)
    return ts, stats


def plot_log(logs: Sequence[tuple[str, Sequence[LogRecord]]], paths: Sequence[Path],
             kind: str = "estimate", title: str | None = None):
    """Plot the squared distance (log scale when every value is positive) and the cosine
    similarity against the timestep, noisiest (left) to cleanest (right), for one or several
    runs `(label, records)` overlaid: the mean over the self-recurrences at each timestep, with
    the min-max range shaded where a timestep has several. Saved to each of `paths` (.png,
    .pdf); returns the matplotlib Figure. Runs without logged cosine similarities get a
    distance panel only (said in the title). Raises FigureError when no run has records of `kind`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if kind not in LOG_KINDS:
        raise FigureError(f"unknown kind {kind!r}: choose one of {', '.join(LOG_KINDS)}")
    curves = []
    for label, records in logs:
        ts, stats = per_timestep(records, kind)
        if ts:
            final = next((r for r in reversed(records) if r.kind == "final"), None)
            curves.append((label, ts, stats, final))
    if not curves:
        present = sorted({r.kind for _, records in logs for r in records} - {"final"})
        raise FigureError(f"no {kind!r} score lines in the log{'s' if len(logs) > 1 else ''}; kinds "
                          f"present: {', '.join(present) or 'none'} (choose one with --kind)")
    with_cosine = [c for c in curves if any(v is not None for v in c[2]["cosine_mean"])]
    without = [c[0] for c in curves if c not in with_cosine]

    figure = Figure(figsize=(7.5, 5.5 if with_cosine else 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 if with_cosine else 1, 1, sharex=True, squeeze=False)[:, 0]
    colours = [f"C{k % 10}" for k in range(len(curves))]
    for (label, ts, stats, final), colour in zip(curves, colours):
        legend = label
        if final is not None:
            legend += f" (final: d {_number(final.distance)}" + (
                f", cos {_number(final.cosine, 3)})" if final.cosine is not None else ")")
        _curve(axes[0], ts, stats, "distance", colour, legend)
        if with_cosine and any(v is not None for v in stats["cosine_mean"]):
            _curve(axes[1], ts, stats, "cosine", colour, label)
    distances = [v for _, _, s, _ in curves for v in s["distance_min"] if math.isfinite(v)]
    if distances and min(distances) > 0:
        axes[0].set_yscale("log")
    axes[0].set_ylabel("squared distance")
    if with_cosine:
        axes[1].set_ylabel("cosine similarity")
    all_ts = [t for _, ts, _, _ in curves for t in ts]
    span = max(all_ts) - min(all_ts)
    axes[-1].set_xlim(max(all_ts) + 0.02 * span + 0.5, min(all_ts) - 0.02 * span - 0.5)
    axes[-1].set_xlabel("timestep t (noisiest \u2192 cleanest)")
    for ax in axes:
        ax.grid(True, alpha=0.3, which="both")
    axes[0].legend(fontsize="small", loc="best")
    several = any(n > 1 for _, _, stats, _ in curves for n in stats["count"])
    heading = title or _KIND_TITLES[kind] + (
        "\nmean over the self-recurrences of each timestep, min\u2013max shaded" if several else "")
    if without:
        heading += ("\n(no cosine similarity in the log: older run format; distance only)" if not with_cosine
                    else f"\n(no cosine similarity logged for: {', '.join(without)})")
    figure.suptitle(heading, fontsize="medium")
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=150)
    return figure


_KIND_TITLES = {
    "estimate": "Images decoded from the estimate of z\u2080, before each guided step",
    "guided": "Images decoded after each guided step",
    "backward": "Backward guidance iterations",
    "z_prev": "z_prev candidates",
}


def _curve(ax, ts, stats, name, colour, label):
    means = [math.nan if v is None else v for v in stats[f"{name}_mean"]]
    ax.plot(ts, means, color=colour, label=label, linewidth=1.2, marker="o" if len(ts) <= 30 else None,
            markersize=3)
    lows, highs = stats[f"{name}_min"], stats[f"{name}_max"]
    if any(lo != hi for lo, hi in zip(lows, highs) if math.isfinite(lo) and math.isfinite(hi)):
        ax.fill_between(ts, lows, highs, color=colour, alpha=0.18, linewidth=0)
