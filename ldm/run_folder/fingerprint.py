"""What must not change between a run and its resumption: a fingerprint of the run, field by
field. Each entry is {"id": what is compared, "shown": how an error message shows it}; an entry
marked "default" is the value runs had before the field existed, so a state saved by an older
version (which lacks it) still matches."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

_CHUNK = 1 << 20  # bytes hashed at each end of a checkpoint file


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def quick_file_id(path: Path) -> str:
    """Size and a hash of the first and last MiB: identifies a multi-GB checkpoint in
    milliseconds (a file replaced by another of the same size with the same ends would pass)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_CHUNK))
        if size > _CHUNK:
            f.seek(max(_CHUNK, size - _CHUNK))
            digest.update(f.read(_CHUNK))
    return f"{size} bytes, sha256 of ends {digest.hexdigest()[:16]}"


def entry(value, shown: str | None = None, default: bool = False) -> dict:
    record = {"id": value, "shown": repr(value) if shown is None else shown}
    return {**record, "default": True} if default else record


def value_entry(value) -> dict:
    """A flag's value, a default while unset."""
    return entry(value, default=value is None)


def target_entry(kind: str, source: str, files: list[str]) -> dict:
    """An image or feature file by its bytes (the file may move); text or an expression by its
    text and the bytes of the files it reads."""
    if kind in ("image", "features"):
        digest = sha256_file(Path(source))
        return entry([kind, digest], f"the {kind} file {source!r} (sha256 {digest[:12]})")
    digests = [sha256_file(Path(f)) for f in files]
    return entry([kind, source, digests], f"the {kind} {source!r}" + (" (or a file it reads)" if files else ""))


def weights_entry(weights: str | None) -> dict:
    if weights and Path(weights).is_file():
        ident = quick_file_id(Path(weights))
        return entry(ident, f"{weights!r} ({ident})")
    if weights:   # a tag of the library, or "random"
        return entry(weights)
    return entry(None, "the library's default weights")


def config_entry(config: str) -> dict:
    digest = sha256_file(Path(config))
    return entry(digest, f"{config!r} (sha256 {digest[:12]})")


def checkpoint_entry(ckpt: str) -> dict:
    """A checkpoint file, or a diffusers folder by its files' names and quick ids."""
    path = Path(ckpt)
    if not path.is_dir():
        ident = quick_file_id(path)
        return entry(ident, f"{ckpt!r} ({ident})")
    files = [f"{p.relative_to(path)} {quick_file_id(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
    ident = f"{len(files)} files, sha256 of their ids {hashlib.sha256(str(files).encode()).hexdigest()[:16]}"
    return entry(ident, f"{ckpt!r} ({ident})")


def differences(saved: dict, now: dict) -> list[str]:
    """One line per field that differs: "<field> is <saved> in the saved state but <now> now"."""
    out = []
    for name in list(saved) + [n for n in now if n not in saved]:
        old, new = saved.get(name), now.get(name)
        if old is None and new is not None and new.get("default"):
            continue   # a field the saving version did not have, at the value it used
        if old is None or new is None:
            out.append(f"{name} is {'unset' if old is None else old['shown']} in the saved state "
                       f"but {'unset' if new is None else new['shown']} now")
        elif json.dumps(old["id"]) != json.dumps(new["id"]):
            out.append(f"{name} is {old['shown']} in the saved state but {new['shown']} now")
    return out
