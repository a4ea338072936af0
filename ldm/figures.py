"""Paper-style mosaics of finished runs: one row per run, target | final | best, with the
cosine similarity and squared distance of each image to the target underneath."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CELL_TEXT_HEIGHT = 28
LABEL_WIDTH = 110


def load_run(folder: str | Path) -> dict:
    """metrics.json of a finished run, with the folder added."""
    folder = Path(folder)
    path = folder / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no finished run (no metrics.json)")
    run = json.loads(path.read_text())
    if not run.get("finished"):
        raise FileNotFoundError(f"{folder} holds an unfinished run: finish it with --resume first")
    run["folder"] = folder
    return run


def _cell(image: Image.Image, size: int) -> Image.Image:
    """Fit an image into a size x size square (nearest-neighbour when enlarging small images)."""
    image = image.convert("RGB")
    scale = size / max(image.size)
    resample = Image.NEAREST if scale >= 1 else Image.BICUBIC
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    cell = Image.new("RGB", (size, size), "white")
    cell.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return cell


def run_mosaic(runs: list[dict], cell: int = 128, pad: int = 6) -> Image.Image:
    """A mosaic with one row per run: target | final | best."""
    font = ImageFont.load_default()
    columns = ("target", "final", "best")
    width = LABEL_WIDTH + len(columns) * (cell + pad) + pad
    height = CELL_TEXT_HEIGHT + len(runs) * (cell + CELL_TEXT_HEIGHT + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(columns):
        draw.text((LABEL_WIDTH + pad + c * (cell + pad), 8), title, fill="black", font=font)
    for r, run in enumerate(runs):
        top = CELL_TEXT_HEIGHT + r * (cell + CELL_TEXT_HEIGHT + pad)
        draw.text((pad, top + cell // 2 - 6), run["extractor"], fill="black", font=font)
        target = run["target"]
        if target["kind"] == "image":
            target_cell = _cell(Image.open(target["source"]), cell)
        else:
            target_cell = Image.new("RGB", (cell, cell), "white")
            ImageDraw.Draw(target_cell).multiline_text((4, 4), _wrap(target["source"], 20),
                                                       fill="black", font=font)
        cells = [(target_cell, None)]
        for key in ("final", "best"):
            cells.append((_cell(Image.open(run["folder"] / run[key]["file"]), cell), run[key]))
        for c, (image, numbers) in enumerate(cells):
            left = LABEL_WIDTH + pad + c * (cell + pad)
            canvas.paste(image, (left, top))
            if numbers:
                draw.text((left, top + cell + 3),
                          f"cos {numbers['cosine']:.3f}  d {numbers['squared_distance']:.3g}",
                          fill="black", font=font)
    return canvas


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])
