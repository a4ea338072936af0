"""The JSON files of runs — `metrics.json` per run, `index.json` per multi-target folder — and
reading runs back (the figures, the benchmarks and the demo read them only through here).

metrics.json: whether the run finished; the target (kind, source, label); the extractor, its
weights and preprocessing; the feature shape; the objective (loss, channels, spatial); the
model (config, ckpt); the decoder and its settings; seed, device, precision, image size, batch
size; iterations done and planned, wall time, guarded steps; for the final and the best image
the file, loss, squared distance and cosine to the target, and the same two numbers re-measured
after saving and reloading the PNG (`reloaded_png`: what a reader of the figure gets);
versions, argv and resumptions. A stopped run adds `stopped`, `resume_state`, `resume_command`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ldm.files import atomic_write_text
from ldm.run_folder import names
from ldm.run_folder.folder import RunFolder, RunFolderError


def image_entry(file: str, loss: float, squared_distance: float, cosine: float,
                reloaded: dict, **where) -> dict:
    """metrics.json's record of one saved image (`where`: t, rec, bk of a best image)."""
    return {"file": file, **where, "loss": loss, "squared_distance": squared_distance,
            "cosine": cosine, "reloaded_png": reloaded}


def write_index(root: Path, targets: list) -> None:
    """index.json of a multi-target run: every target, its folder and its outcome."""
    entries = []
    for target in targets:
        folder = RunFolder(root / target.label)
        status, _ = folder.status()
        entry = {"label": target.label, "kind": target.kind, "source": target.source,
                 "folder": target.label, "status": status}
        if status == "finished":
            try:
                final = read_metrics(folder.path)["final"]
                entry["final"] = {k: final[k] for k in ("squared_distance", "cosine")}
            except (RunFolderError, KeyError, TypeError):
                pass
        entries.append(entry)
    atomic_write_text(root / names.INDEX, json.dumps({"targets": entries}, indent=2))


def index_order(folder: Path) -> dict[str, int]:
    """Subfolder name → position in the folder's index.json (empty without a readable one)."""
    try:
        targets = json.loads((folder / names.INDEX).read_text(encoding="utf-8"))["targets"]
        return {str(t["folder"]): k for k, t in enumerate(targets)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def is_run_folder(folder: Path) -> bool:
    return (folder / names.METRICS).is_file() or (folder / names.LOG).is_file()


def read_metrics(folder: Path) -> dict:
    """metrics.json of a run folder; RunFolderError when it is missing or unreadable."""
    path = Path(folder) / names.METRICS
    if not path.is_file():
        raise RunFolderError(f"{folder} holds no metrics.json: the run is still going, or was "
                             "killed before writing it (rerun it, or resume it with --resume)")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFolderError(f"cannot read {path} ({err}): rerun that run with --overwrite, or "
                             "remove the folder") from None
    if not isinstance(run, dict):
        raise RunFolderError(f"{path} is not a run's metrics (a JSON object expected): rerun that "
                             "run with --overwrite, or remove the folder")
    return run


def unfinished_hint(run: dict) -> str:
    reason = (run.get("stopped") or {}).get("reason")
    command = run.get("resume_command")
    why = f"stopped by {reason}" if reason else "not finished"
    return f"{why}; finish it with `{command}`" if command else f"{why}; finish it with --resume"


def load_run(folder: str | Path) -> dict:
    """metrics.json of a finished run, with `folder` added; RunFolderError for a folder without
    one, an unreadable one, or an unfinished run."""
    folder = Path(folder)
    run = read_metrics(folder)
    if not run.get("finished"):
        raise RunFolderError(f"{folder} holds an unfinished run: {unfinished_hint(run)}")
    for key in ("target", "extractor", "final"):
        if key not in run:
            raise RunFolderError(f"{folder / names.METRICS} has no {key!r} entry: it was not written "
                                 "by a run of this repository (rerun it, or remove the folder)")
    for key in ("final", "best"):
        _check_image_entry(folder, key, run.get(key))
    run["folder"] = folder
    return run


def _check_image_entry(folder: Path, key: str, entry) -> None:
    """A run's image is a file of its own folder: a bare name, not a link (a figure never draws
    a file elsewhere that a metrics.json names)."""
    if entry is None and key == "best":
        return
    file = entry.get("file") if isinstance(entry, dict) else None
    if (not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file
            or (folder / file).is_symlink()):
        raise RunFolderError(f"{folder / names.METRICS}: its {key!r} entry names the image {file!r:.200}, "
                             "which is not a file of the run folder (a bare name, not a link): rerun "
                             "that run with --overwrite, or remove the folder")


def find_run_folders(paths: Iterable[str | Path]) -> list[Path]:
    """Every run folder (metrics.json or log.txt) at or under each path: the paths in the order
    given; under each, subfolders in the order of the folder's index.json (a multi-target run
    lists its targets in --prompt order) and by name otherwise. A path may also name a run's
    metrics.json or log.txt."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise RunFolderError(f"{path} does not exist: pass run folders (each with metrics.json "
                                 "and log.txt) or folders holding them")
        if path.is_file():
            if path.name not in (names.METRICS, names.LOG):
                raise RunFolderError(f"{path} is a file, not a run folder: pass the folder holding "
                                     "metrics.json and log.txt (or a folder of such folders)")
            folders = [path.parent]
        else:
            folders = _walk(path)
            if not folders:
                raise RunFolderError(f"no run folder under {path}: a run folder holds metrics.json "
                                     "and log.txt (the --optim_folder of a run)")
        found.extend(f for f in folders if f not in found)
    return found


def _walk(folder: Path) -> list[Path]:
    """Run folders at or under `folder` (symbolic links to folders are not followed)."""
    found = [folder] if is_run_folder(folder) else []
    try:
        children = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()
                    and not p.name.startswith(".")]
    except OSError as err:
        raise RunFolderError(f"cannot list {folder} ({err.strerror or err}): check its permissions") from None
    order = index_order(folder)
    children.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    for child in children:
        found.extend(_walk(child))
    return found


def collect_runs(paths: Iterable[str | Path]) -> tuple[list[dict], list[str]]:
    """The finished runs at or under `paths`, and one warning per run folder skipped because it
    is unfinished. RunFolderError when none is finished or a metrics.json cannot be read."""
    runs, skipped = [], []
    folders = find_run_folders(paths)
    for folder in folders:
        if not (folder / names.METRICS).is_file():
            skipped.append(f"skipping {folder}: no metrics.json yet (the run is still going, or "
                           "was killed; resume it with --resume)")
            continue
        metrics = read_metrics(folder)
        if not metrics.get("finished"):
            skipped.append(f"skipping unfinished run {folder}: {unfinished_hint(metrics)}")
            continue
        runs.append(load_run(folder))
    if not runs:
        raise RunFolderError("no finished run among " + ", ".join(map(str, folders))
                             + ": finish the runs first (--resume)")
    return runs, skipped
