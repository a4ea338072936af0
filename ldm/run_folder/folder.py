"""One run's folder: what it holds, who writes it, and every write into it.

- Status: "new" (missing, empty, or what a run killed before its first resume state left),
  "finished", "interrupted" (a resume state, or metrics.json saying the run did not finish),
  "partial" (output names, e.g. a log.txt, but not of a run of this tool: replaced only with
  --overwrite).
- One writer at a time: a lock (`fcntl.flock` on `.lock`, released by the kernel when the
  process ends, however it ends); a second run into the folder is refused naming the first.
- Nothing lost: finished or interrupted runs are not replaced unless asked; `--overwrite`
  moves the old outputs aside (`.overwritten/`) only once the new run has loaded its models and
  targets, deletes them when the new run has results of its own, and puts them back if it fails
  (or, after a kill, at the next start).
- Nothing written through a symbolic link (an output name, `.overwritten`, a target's
  subfolder), no output name taken by a folder.
- Every image and JSON file is written atomically (ldm/files.py); `log.txt` is appended line
  by line (follow it with `tail -f`) and cut back to a resume state's length on resume.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from ldm.errors import InputError
from ldm.files import atomic_write, atomic_write_text, fsync_folder, is_temporary, write_safetensors
from ldm.models.diffusion.sampler_state import BestImage, SamplerState
from ldm.run_folder import names
from ldm.run_folder.state_file import load_state, save_state


class RunFolderError(InputError):
    """A folder that cannot take this run; the message says why and what to do."""


class RunFolder:
    def __init__(self, path: str | Path, subfolder: bool = False):
        """`subfolder`: a target's folder inside a multi-target --optim_folder (never a link)."""
        self.path = Path(path)
        self.subfolder = subfolder
        self._log = None
        self._lock = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # --- what it holds --------------------------------------------------------------------
    def status(self) -> tuple[str, str]:
        """→ (status, detail): "new", "finished" or "interrupted", and why."""
        if not self.path.is_dir():
            return "new", ""
        metrics, state = self / names.METRICS, self / names.STATE
        if metrics.is_file():
            try:
                finished = json.loads(metrics.read_text()).get("finished", True) is not False
            except (ValueError, AttributeError, OSError, UnicodeDecodeError):
                finished = True  # unreadable: treat as a finished run, so it is not clobbered
            if finished:
                return "finished", metrics.name
        if state.is_file():
            return "interrupted", state.name
        if metrics.is_file():
            return "interrupted", f"{metrics.name} says the run did not finish, and there is no {state.name}"
        if (self / names.FINAL).is_file():
            return "finished", names.FINAL   # e.g. a finished run of the reference code
        found = [p.name for p in self.outputs()]
        if found and not (self / names.FEATURES).is_file():   # a run writes it first: not a run's
            return "partial", (f"{', '.join(found[:3])} but no run of this tool (a run writes "
                               f"{names.FEATURES} first)")
        return "new", ""   # or what a run killed before its first resume state left: replaced

    def outputs(self) -> list[Path]:
        """This tool's output files in the folder (what --overwrite replaces)."""
        if not self.path.is_dir():
            return []
        return sorted({p for pattern in names.OUTPUT_PATTERNS for p in self.path.glob(pattern)})

    def check_writable_names(self) -> None:
        """RunFolderError if an output name is a symbolic link or a folder (a write would go
        through the link, or fail after the run)."""
        if self.subfolder and self.path.is_symlink():
            raise RunFolderError(f"{self.path} is a symbolic link; a target's folder is never written "
                                 "through a link: remove it or choose another --optim_folder")
        if not self.path.is_dir():
            return
        aside = self / names.SET_ASIDE
        if aside.is_symlink() or (aside.exists() and not aside.is_dir()):
            raise RunFolderError(f"{aside} is not a folder of this tool (a link or a file); --overwrite "
                                 "moves outputs into it: remove it or choose another --optim_folder")
        for path in [*self.outputs(), self / names.LOCK, *map(self.__truediv__, (names.LOG, names.METRICS,
                     names.FINAL, names.STATE, names.FEATURES))]:
            if path.is_symlink():
                raise RunFolderError(f"{path} is a symbolic link; outputs are never written through "
                                     "links: remove it or choose another --optim_folder")
            if path.is_dir():
                raise RunFolderError(f"{path} is a folder, but the run writes a file of that name: "
                                     "move it or choose another --optim_folder")

    # --- taking the folder ------------------------------------------------------------------
    def create(self) -> list[Path]:
        """Make the folder (and its parents) and check it can be written; → the folders this
        call created, deepest first."""
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self / f".write_test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise RunFolderError(f"cannot write to --optim_folder {str(self.path)!r}: "
                                 f"{err.strerror or err}") from None
        for path in self.path.iterdir():
            if is_temporary(path.name):       # half-written files of a killed process
                path.unlink(missing_ok=True)
        return created

    def lock(self) -> None:
        """Take the folder for this process (until it exits or `unlock`); RunFolderError naming
        the process that holds it."""
        fd = os.open(self / names.LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"{self.path} is being written by {holder}; wait for it to finish, "
                                 "or choose another --optim_folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"process {os.getpid()} on {socket.gethostname()} since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv)[:300]})").encode(), 0)
        self._lock = fd

    def unlock(self) -> bool:
        """Release the folder; → whether this process held it."""
        if self._lock is None:
            return False
        os.close(self._lock)   # closing the descriptor releases the flock
        self._lock = None
        return True

    @contextmanager
    def replacing_outputs(self, kept: Callable[[BaseException], bool] = lambda error: False):
        """`--overwrite`: move this folder's outputs aside for the block. If it raises (unless
        `kept(error)`: a stop that saved the new run's state), the new run's outputs are
        removed and the old ones come back; otherwise the old ones are deleted."""
        aside = self / names.SET_ASIDE
        aside.mkdir(exist_ok=True)
        for path in self.outputs():
            os.replace(path, aside / path.name)
        (aside / names.SET_ASIDE_DONE).touch()
        fsync_folder(aside)
        try:
            yield
        except BaseException as error:
            if kept(error):
                shutil.rmtree(aside, ignore_errors=True)
            else:
                self.close_log()
                self.restore_set_aside()
            raise
        shutil.rmtree(aside, ignore_errors=True)

    def restore_set_aside(self) -> bool:
        """Put back the outputs an `--overwrite` that failed or was killed left aside, removing
        what the new run wrote since (if the move had finished; a move cut short leaves only old
        outputs in the folder); → whether there were any."""
        aside = self / names.SET_ASIDE
        if not aside.is_dir() or aside.is_symlink():
            return False
        done = aside / names.SET_ASIDE_DONE
        if done.exists():
            for path in self.outputs():
                path.unlink(missing_ok=True)
            done.unlink()
        for path in aside.iterdir():
            os.replace(path, self / path.name)
        aside.rmdir()
        fsync_folder(self.path)
        return True

    # --- log ------------------------------------------------------------------------------
    def open_log(self, append: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
        self._log = os.fdopen(os.open(self / names.LOG, flags, 0o644), "w", buffering=1, encoding="utf-8")

    def log(self, line: str) -> None:
        self._log.write(line + "\n")

    def sync_log(self) -> int:
        """Flush log.txt to disk; → its length in bytes."""
        self._log.flush()
        os.fsync(self._log.fileno())
        return (self / names.LOG).stat().st_size

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_length(self) -> int:
        path = self / names.LOG
        return path.stat().st_size if path.is_file() else 0

    def truncate_log(self, length: int) -> None:
        """Cut log.txt back to `length` (its length when the resume state was saved), dropping
        the lines of iterations that will be recomputed."""
        os.truncate(self / names.LOG, length)

    # --- files ----------------------------------------------------------------------------
    def save_png(self, name: str, image: torch.Tensor) -> Path:
        """An image in [-1, 1] saved as the reference does (clamped, ×255, rounded)."""
        from torchvision.utils import save_image
        path = self / name
        atomic_write(path, lambda tmp: save_image((image.float().cpu() + 1) / 2, tmp, format="png"))
        return path

    def save_best(self, best: BestImage) -> Path | None:
        """Write the best image; remove best images of earlier attempts of this run."""
        if best.image is None:
            return None
        path = self.save_png(names.best_image(best), best.image)
        for old in self.path.glob(names.BEST_PATTERN):
            if old.name != path.name:
                old.unlink(missing_ok=True)
        return path

    def save_features(self, goal: torch.Tensor, target: dict) -> None:
        """The target's features, reusable as a target (`--prompt <folder>/target_features.safetensors`)."""
        atomic_write(self / names.FEATURES, lambda tmp: write_safetensors(
            tmp, {"features": goal[0].detach().float().cpu().contiguous()}, {"target": json.dumps(target)}))

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_text(self / names.METRICS, json.dumps(metrics, indent=2))

    def write_state(self, state: SamplerState, run: dict) -> None:
        save_state(self / names.STATE, state, run)

    def read_state(self) -> tuple[SamplerState, dict]:
        return load_state(self / names.STATE)

    def finish(self) -> None:
        """The run is done: nothing is left to resume."""
        (self / names.STATE).unlink(missing_ok=True)
