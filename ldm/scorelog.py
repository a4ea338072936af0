"""Scores as data, and the one place that knows the reference's `log.txt` line format.

The sampler reports what it evaluates as records: a `Score` per scored image (timestep,
self-recurrence, stage, squared distance or loss, cosine, backward iteration), an `Improved`
when an image beats the best so far, a `Guarded` when a guidance gradient was zero. This module
writes them as the reference's log lines, byte for byte, and parses such lines back into
records; nothing else reads or writes score text.

Stages and how the reference codes them in the self-recurrence field ("rec"):

    estimate            j        D(ẑ0) before the guided step (forward guidance differentiates it)
    guided              j + 0.5  D(ẑ0′) after the guided step
    backward_iteration  j + 0.7  an Adam iteration of backward guidance (", <k>th backward iteration")
    backward            j + 0.9  the backward-guided estimate (", <max_iters>th backward iteration")
    z_prev              j        a z_prev candidate (" (z_prev)")
    final               -        the output, "-1th timestep (FINAL)"

    <t>th timestep, <rec>th self-recurrence[, <k>th backward iteration] -> xy_dists:<d>, xy_cossim:<c>
    <t>th timestep, <j>th self-recurrence (z_prev) -> xy_dists:<d>, xy_cossim:<c>
    -1th timestep (FINAL) -> xy_dists:<d>, xy_cossim:<c>
    !!! Found a better image (<old> -> <new>)          (scores are −distance)
    !!! Found a better z_prev (<old> -> <new>)
    <t>th timestep, <j>th self-recurrence: guidance gradient is zero (or its norm overflows); ...
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

STAGE_OFFSETS = {"estimate": 0.0, "guided": 0.5, "backward_iteration": 0.7, "backward": 0.9}
STAGES = (*STAGE_OFFSETS, "z_prev", "final")
SCORED_STAGES = ("estimate", "guided", "backward", "z_prev")   # what score curves plot


@dataclass(frozen=True)
class Score:
    """One scored image. `distance` is the run's loss (the squared distance by default)."""

    image: int                        # batch index
    timestep: int                     # -1 for the final image
    recurrence: int | None
    stage: str
    distance: float
    cosine: float | None
    backward_iteration: int | None = None

    @property
    def rec(self) -> float:
        """The reference's coded self-recurrence (j, j + 0.5, j + 0.7, j + 0.9)."""
        return self.recurrence + STAGE_OFFSETS.get(self.stage, 0.0)


@dataclass(frozen=True)
class Improved:
    """An image (or a z_prev candidate) beat the best score (−distance) so far."""

    image: int
    old: float
    new: float
    what: str = "image"               # "image" | "z_prev"


@dataclass(frozen=True)
class Guarded:
    """The guidance gradient of an image was zero: that step was taken without guidance."""

    image: int
    timestep: int
    recurrence: int


Record = Score | Improved | Guarded


def format_rec(rec: float) -> str:
    return str(int(rec)) if float(rec).is_integer() else str(rec)


def decode_rec(rec: float, backward_iteration: int = -1) -> tuple[int, str]:
    """The reference's coded self-recurrence → (j, stage)."""
    j = math.floor(rec + 1e-9)
    offset = round(rec - j, 1)
    stage = next((s for s, o in STAGE_OFFSETS.items() if o == offset), None)
    if stage is None:
        raise ValueError(f"self-recurrence {rec} is not j, j + 0.5, j + 0.7 or j + 0.9")
    return j, stage


def format_line(record: Record, cosine: bool = True) -> str:
    """The reference's log line of `record` (`cosine`: with the xy_cossim field)."""
    if isinstance(record, Improved):
        return f"!!! Found a better {record.what} ({record.old} -> {record.new})"
    if isinstance(record, Guarded):
        return (f"{record.timestep}th timestep, {record.recurrence}th self-recurrence: guidance "
                "gradient is zero (or its norm overflows); this step is taken without guidance")
    if record.stage == "final":
        label = "-1th timestep (FINAL)"
    elif record.stage == "z_prev":
        label = f"{record.timestep}th timestep, {record.recurrence}th self-recurrence (z_prev)"
    else:
        label = f"{record.timestep}th timestep, {format_rec(record.rec)}th self-recurrence"
        if record.stage in ("backward_iteration", "backward"):
            label += f", {record.backward_iteration}th backward iteration"
    text = f"{label} -> xy_dists:{record.distance}"
    return text + f", xy_cossim:{record.cosine}" if cosine and record.cosine is not None else text


_SCORE = re.compile(
    r"^(?P<t>-?\d+)th timestep, (?P<rec>\d+(?:\.\d+)?)th self-recurrence(?P<zprev> \(z_prev\))?"
    r"(?:, (?P<bk>-?\d+)th backward iteration)?"
    r" -> xy_dists:(?P<d>[^,\s]+)(?:, xy_cossim:(?P<c>[^,\s]+))?\s*$")
_FINAL = re.compile(r"^-1th timestep \(FINAL\) -> xy_dists:(?P<d>[^,\s]+)(?:, xy_cossim:(?P<c>[^,\s]+))?\s*$")
_IMPROVED = re.compile(r"^!!! Found a better (?P<what>image|z_prev) \((?P<old>\S+) -> (?P<new>\S+)\)\s*$")
STOP_PREFIXES = ("Interrupted by ", "Numerical fault: ")


def _float(text: str | None) -> float | None:
    return None if text is None else float(text)


def parse_line(line: str, image: int = 0) -> Record | None:
    """The record of one log line, or None for lines that carry none (Elapsed time, Run
    options, a stop message)."""
    if (m := _SCORE.match(line)) is not None:
        bk = int(m["bk"]) if m["bk"] is not None else None
        if m["zprev"]:
            j, stage = int(float(m["rec"])), "z_prev"
        else:
            j, stage = decode_rec(float(m["rec"]))
        return Score(image, int(m["t"]), j, stage, float(m["d"]), _float(m["c"]), bk)
    if (m := _FINAL.match(line)) is not None:
        return Score(image, -1, None, "final", float(m["d"]), _float(m["c"]))
    if (m := _IMPROVED.match(line)) is not None:
        return Improved(image, float(m["old"]), float(m["new"]), m["what"])
    return None


def read_scores(path: str | Path) -> list[Score]:
    """Every `Score` in a run's log.txt, in order (OSError if unreadable)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return [r for r in map(parse_line, text.splitlines()) if isinstance(r, Score)]


def stop_message(path: str | Path) -> str | None:
    """"Interrupted by ..." / "Numerical fault: ..." when the log ends that way, else None
    (a stopped run that was resumed went on scoring after its stop line)."""
    last = None
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(STOP_PREFIXES):
            last = line.strip()
        elif isinstance(parse_line(line), Score):
            last = None
    return last
