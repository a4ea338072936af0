"""Writing files so that a kill at any moment leaves the old file or the new one, never a torn
one: write a temporary file in the same folder, flush it to disk, rename it over the target,
flush the folder. Temporary names are unique per process and per call, hidden, and end in
`.tmp` (never matching an output pattern such as `*.png`)."""
from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ldm.errors import InputError

TEMPORARY_SUFFIX = ".tmp"
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})   # no space, quota, file size limit


NAME_MAX, PATH_MAX = 255, 4095   # bytes, as Linux file systems take them


def check_path_name(path: str | Path, what: str) -> None:
    """InputError for a path that cannot be written or recorded: not UTF-8 (it goes into logs
    and JSON files), a component over NAME_MAX bytes, or more than PATH_MAX bytes in all."""
    text = str(path)
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} {text.encode('utf-8', 'backslashreplace').decode()[:200]!r}: the name "
                         "is not valid UTF-8 (it is recorded in log.txt and metrics.json): rename it") from None
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX or len(raw) > PATH_MAX:
        raise InputError(f"{what} {text[:80]!r}...: {len(longest)} bytes in one name or {len(raw)} in all, "
                         f"more than a file system takes ({NAME_MAX} and {PATH_MAX}): choose a shorter one")


def not_a_file(path: str | Path) -> str | None:
    """Why `path` is not a regular file to read ("no such file", "a folder, not a file", ...),
    or None if it is one."""
    try:
        if Path(path).is_file():
            return None
        if Path(path).is_dir():
            return "a folder, not a file"
        return "not a regular file" if Path(path).exists() else "no such file"
    except (OSError, ValueError):   # a name over the file system's limits, a NUL byte
        return "no such file"


def fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_temporary(name: str) -> bool:
    """A temporary file of an atomic write (left behind by a killed process)."""
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary_path)` then commit it to `path` atomically; the temporary file never
    outlives the call (on any error, e.g. a full disk, `path` keeps its old content)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """`tensors` as a safetensors file (a writer for `atomic_write`): serialised in memory and
    written by Python, so that a full disk or a file-size limit is an OSError (safetensors' own
    file writer raises its own error type for them)."""
    from safetensors.torch import save
    Path(path).write_bytes(save(tensors, metadata=metadata))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
