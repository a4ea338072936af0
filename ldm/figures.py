"""Figures of guided-decoding runs (`scripts/make_figure.py`).

Runs are found and read through ldm/run_folder (`find_run_folders`, `collect_runs`: run
folders or parent folders, in index.json order), their scores through ldm/scorelog.

- **Mosaics** (`run_mosaic`, paper style): one row per target, the target in the first column,
  then for each model (or label) a final | best column pair under the model's name, each image
  captioned "cos 0.987 / d 12.3" (cosine similarity and squared distance of its feature to the
  target feature).
- **Score curves** (`read_log`, `plot_log`): the squared distance and the cosine similarity
  logged at each timestep, from the noisiest to the cleanest, one or several runs overlaid.

Bad input (a missing path, no finished run, an unreadable metrics.json, a log without scores)
raises `FigureError`, whose message names the problem and the fix.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ldm.errors import InputError
from ldm.files import atomic_write
from ldm.images import ImageFileError, read_rgb
from ldm.scorelog import Score, read_scores

IMAGE_COLUMNS = ("final", "best")
LOG_KINDS = ("estimate", "guided", "backward", "z_prev")   # curves: stages, the backward ones together
PDF_DPI = 100

_BACKGROUND = "white"
_PLACEHOLDER = (208, 208, 208)
_TEXT_CELL = (240, 240, 240)


class FigureError(InputError):
    """Bad input for a figure: the message names the problem and the fix."""


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
    reloaded: bool = True               # captions of the saved PNGs (else the sampler's images)
    header_height: int = field(init=False)
    row_height: int = field(init=False)
    group_gap: int = field(init=False)
    footer_height: int = field(init=False)

    def __post_init__(self):
        line = _line_height(self.font_size)
        self.header_height = self.pad + 2 * line + self.pad
        self.row_height = self.cell + self.caption_lines * line + 2 * self.pad
        self.group_gap = 3 * self.pad
        self.footer_height = line + self.pad

    @property
    def group_width(self) -> int:
        """Width of one model's columns (final | best)."""
        return len(self.images) * (self.cell + self.pad) - self.pad

    @property
    def size(self) -> tuple[int, int]:
        width = 2 * self.pad + self.cell + len(self.groups) * (self.group_gap + self.group_width)
        return width, self.header_height + len(self.rows) * self.row_height + self.footer_height

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


def default_label(run: dict) -> str:
    """A run's column label: its extractor, and its decoder when that is not the guided one."""
    from ldm.decoders import DecoderOptions

    kind = (run.get("decoder") or {}).get("kind", DecoderOptions.kind)
    return run["extractor"] if kind == DecoderOptions.kind else f"{run['extractor']} ({kind})"


def mosaic_layout(runs: Sequence[dict], cell: int = 128, pad: int = 6,
                  labels: Sequence[str] | None = None, images: Sequence[str] = IMAGE_COLUMNS,
                  reloaded: bool = True) -> MosaicLayout:
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
        labels = [default_label(run) for run in runs]
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
    return MosaicLayout(cell, pad, groups, images, targets, rows, font_size, caption_lines, reloaded)


def run_mosaic(runs: Sequence[dict], cell: int = 128, pad: int = 6,
               labels: Sequence[str] | None = None, images: Sequence[str] = IMAGE_COLUMNS,
               reloaded: bool = True) -> Image.Image:
    """The paper-style mosaic of finished runs (`load_run` / `collect_runs` dicts): rows =
    targets; columns = the target, then final | best per model under the model's name, each
    captioned with the cosine similarity and squared distance to the target: of the saved PNG
    (metrics.json's `reloaded_png`, what a reader of the figure gets) or, with `reloaded=False`,
    of the sampler's unclamped image. A footer says which."""
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
    footer = FOOTERS[layout.reloaded]
    draw.text((pad, layout.size[1] - layout.footer_height),
              _fit_text(footer, layout.size[0] - 2 * pad, font), fill="black", font=font)
    return canvas


FOOTERS = {True: "cos / d: cosine and squared distance of each saved PNG's feature to the target's",
           False: "cos / d: cosine and squared distance of the sampler's (unclamped) images to the target"}


def save_image(image: Image.Image, paths: Sequence[Path]) -> list[Path]:
    """Save as PNG and/or PDF (by suffix; the PDF page at PDF_DPI), each atomically."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".pdf":
            atomic_write(path, lambda tmp: image.save(tmp, "PDF", resolution=PDF_DPI))
        else:
            atomic_write(path, lambda tmp: image.save(tmp, "PNG"))
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
            return _fit(read_rgb(path), cell), Path(source).stem
        except ImageFileError:
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
    path = Path(run["folder"]) / entry["file"]   # a file of the run folder (load_run checks)
    try:
        return _fit(read_rgb(path), cell), entry
    except ImageFileError:
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

def read_log(path: str | Path) -> list[Score]:
    """The scored images of a run's log.txt, in order (through ldm.scorelog). Raises
    FigureError when the file cannot be read or holds no score line."""
    try:
        scores = read_scores(path)
    except OSError as err:
        raise FigureError(f"cannot read {path} ({err.strerror or err}): pass a run folder with a "
                          "readable log.txt") from None
    if not scores:
        raise FigureError(f"{path} has no score lines: it is not the log.txt of a decoding run, or "
                          "the run stopped before scoring anything")
    return scores


def kind_of(score: Score) -> str:
    """The curve a score belongs to: its stage, the two backward stages together."""
    return "backward" if score.stage == "backward_iteration" else score.stage


def per_timestep(records: Sequence[Score], kind: str) -> tuple[list[int], dict[str, list]]:
    """Timesteps (noisiest first) and, per timestep, the number of records of `kind` ("count")
    and the mean / min / max of their distances and cosine similarities ("cosine_mean" entries
    are None where the log has no cosine)."""
    groups: dict[int, list[Score]] = {}
    for record in records:
        if kind_of(record) == kind:
            groups.setdefault(record.timestep, []).append(record)
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


def plot_log(logs: Sequence[tuple[str, Sequence[Score]]], paths: Sequence[Path],
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
            final = next((r for r in reversed(records) if r.stage == "final"), None)
            curves.append((label, ts, stats, final))
    if not curves:
        present = sorted({kind_of(r) for _, records in logs for r in records} - {"final"})
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
        atomic_write(Path(path), lambda tmp, kind=Path(path).suffix[1:]: figure.savefig(tmp, dpi=150, format=kind))
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
