"""Files of a guided run that must survive crashes: the resume state, atomic writes, and what an
output folder already holds.

The resume state is one safetensors file, `<optim_folder>/resume_state.safetensors`: tensors
only (read back with safetensors, nothing is ever unpickled) plus a JSON string in the file's
metadata.

    tensors   z, history, best_prev_score, do_backward, [best_prev_z],
              generator.<b> (uint8, torch.Generator.get_state()), [best.<b>.image]
    metadata  "format": "feature-space-decoder/resume-state", "version": "1",
              "sampler": JSON of the SamplerState's scalars (k, j, timestep, history_count,
                         iterations, guard_events, batch, best records without their images),
              "run":     JSON of the command line's bookkeeping (fingerprint, log length, argv, ...)

Every file is written to a temporary name in the same folder, flushed to disk and renamed over
the old one, so a kill at any moment leaves either the old or the new file, never a torn one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from dataclasses import fields
from pathlib import Path

import torch

from ldm.models.diffusion.feature_guidance import BestImage, GuidanceSettings, SamplerState

STATE_FILE = "resume_state.safetensors"
FORMAT = "feature-space-decoder/resume-state"
VERSION = "1"
_CHUNK = 1 << 20  # bytes hashed at each end of a checkpoint file


class RunStateError(Exception):
    """A resume state that cannot be read or does not belong to this run."""


# --- atomic writes ----------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
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


def temporary_path(path: Path) -> Path:
    """Where `path` is written before the rename: hidden, same folder, never matching *.png."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def commit(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it over `path`, fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = temporary_path(path)
    try:
        tmp.write_bytes(data)
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --- the state file -----------------------------------------------------------------------------
def _best_record(best: BestImage) -> dict:
    return {"score": best.score, "t": best.t, "rec": best.rec, "bk": best.bk, "cosine": best.cosine,
            "has_image": best.image is not None}


def save_state(path: Path, state: SamplerState, run: dict) -> None:
    """Write `state` and the caller's `run` dict (JSON-able) atomically to `path`."""
    from safetensors.torch import save_file

    cpu = lambda t: t.detach().cpu().contiguous().clone()  # noqa: E731
    tensors = {"z": cpu(state.z), "history": cpu(state.history),
               "best_prev_score": cpu(state.best_prev_score), "do_backward": cpu(state.do_backward)}
    if state.best_prev_z is not None:
        tensors["best_prev_z"] = cpu(state.best_prev_z)
    for b, g_state in enumerate(state.generator_states):
        tensors[f"generator.{b}"] = cpu(g_state)
    for b, best in enumerate(state.best):
        if best.image is not None:
            tensors[f"best.{b}.image"] = cpu(best.image)
    sampler = {"k": state.k, "j": state.j, "timestep": state.timestep,
               "history_count": state.history_count, "iterations": state.iterations,
               "guard_events": state.guard_events, "batch": len(state.best),
               "best": [_best_record(b) for b in state.best]}
    # json writes floats with repr, which reads back bit for bit (also -Infinity and NaN).
    metadata = {"format": FORMAT, "version": VERSION, "sampler": json.dumps(sampler),
                "run": json.dumps(run)}
    tmp = temporary_path(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_header(f, path: Path) -> dict:
    """The JSON header of an open safetensors file (8-byte little-endian length, then JSON)."""
    head = f.read(8)
    if len(head) < 8:
        raise RunStateError(f"{path} is not a readable resume state (truncated header)")
    length = struct.unpack("<Q", head)[0]
    if length > 100 * 1024 ** 2:
        raise RunStateError(f"{path} is not a readable resume state (header of {length} bytes)")
    try:
        return json.loads(f.read(length))
    except ValueError as err:
        raise RunStateError(f"{path} is not a readable resume state ({err})") from err


def _metadata(header: dict, path: Path) -> dict:
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise RunStateError(f"{path} is not a resume state of this tool")
    if metadata.get("version") != VERSION:
        raise RunStateError(f"{path} is a resume state of format version {metadata.get('version')}, "
                            f"this version reads {VERSION}")
    return metadata


def load_state(path: Path) -> tuple[SamplerState, dict]:
    """→ (SamplerState on the CPU, the `run` dict). RunStateError if unreadable.

    The file is read through one file descriptor, so a writer renaming a new state over it
    meanwhile cannot mix two files (safetensors' own `safe_open` opens the path twice)."""
    from safetensors.torch import load as load_tensors

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RunStateError(f"no resume state in {path.parent} ({path.name} does not exist)") from None
    metadata = _metadata(_read_header(io.BytesIO(data), path), path)
    try:
        tensors = load_tensors(data)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise RunStateError(f"{path} is not a readable resume state ({type(err).__name__}: {err})") from err
    try:
        sampler, run = json.loads(metadata["sampler"]), json.loads(metadata["run"])
        best = [BestImage(r["score"], r["t"], r["rec"], r["bk"],
                          tensors[f"best.{b}.image"] if r["has_image"] else None, r["cosine"])
                for b, r in enumerate(sampler["best"])]
        state = SamplerState(
            k=sampler["k"], j=sampler["j"], timestep=sampler["timestep"], z=tensors["z"],
            history=tensors["history"], history_count=sampler["history_count"], best=best,
            best_prev_score=tensors["best_prev_score"], best_prev_z=tensors.get("best_prev_z"),
            do_backward=tensors["do_backward"], iterations=sampler["iterations"],
            guard_events=sampler["guard_events"],
            generator_states=[tensors[f"generator.{b}"] for b in range(sampler["batch"])])
    except (KeyError, TypeError, ValueError) as err:
        raise RunStateError(f"{path} is an incomplete resume state (missing {err})") from err
    return state, run


def split_state(state: SamplerState) -> list[SamplerState]:
    """A batch's state → one state per image (each target's folder keeps its own). The position
    (k, j, timestep) and the iteration counters are shared by the whole batch."""
    def row(t, b):
        return None if t is None else t[b:b + 1].clone()

    return [SamplerState(state.k, state.j, state.timestep, row(state.z, b), row(state.history, b),
                         state.history_count, [state.best[b]], row(state.best_prev_score, b),
                         row(state.best_prev_z, b), row(state.do_backward, b), state.iterations,
                         state.guard_events, [state.generator_states[b]])
            for b in range(len(state.best))]


def position(state: SamplerState) -> tuple[int, int, int, int]:
    """Where a state stands; states can be batched together only at the same position."""
    return state.k, state.j, state.iterations, state.history_count


def stack_states(states: list[SamplerState]) -> SamplerState:
    """Per-image states at one position → the batch's state (the inverse of split_state)."""
    first = states[0]
    if any(position(s) != position(first) for s in states):
        raise ValueError("resume states at different positions cannot be batched together")
    if len({s.best_prev_z is None for s in states}) > 1:
        raise ValueError("resume states disagree on the z_prev candidate")
    cat = lambda name: torch.cat([getattr(s, name) for s in states])  # noqa: E731
    return SamplerState(first.k, first.j, first.timestep, cat("z"), cat("history"),
                        first.history_count, [b for s in states for b in s.best], cat("best_prev_score"),
                        None if first.best_prev_z is None else cat("best_prev_z"), cat("do_backward"),
                        first.iterations, max(s.guard_events for s in states),
                        [g for s in states for g in s.generator_states])


def peek_run(path: Path) -> dict:
    """The `run` dict of a state file plus its sampler position ("sampler"), from its header
    only (one open file: safe while another process replaces the file)."""
    with open(path, "rb") as f:
        metadata = _metadata(_read_header(f, path), path)
    return {**json.loads(metadata["run"]), "sampler": json.loads(metadata["sampler"])}


# --- fingerprint ------------------------------------------------------------------------------
SETTING_FLAGS = {
    "forward_guidance": "--optim_forward_guidance",
    "forward_guidance_wt": "--optim_forward_guidance_wt",
    "grad_clip_threshold": "--optim_grad_clip_threshold",
    "num_steps": "--optim_num_steps",
    "early_emp_end": "--optim_early_emp_end",
    "backward_guidance": "--optim_backward_guidance",
    "lr": "--optim_lr",
    "max_iters": "--optim_max_iters",
    "loss_cutoff": "--optim_loss_cutoff",
    "avg_sim_to_start_backward": "--optim_avg_sim_to_start_backward",
    "sim_queue_size": "--optim_sim_queue_size",
    "select_prev": "--optim_select_prev",
    "save_intermediates": "--optim_print",
    "print_every": "the intermediate-image interval",
    "timesteps": "--optim_timesteps",
}


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


def _entry(value, shown: str | None = None) -> dict:
    return {"id": value, "shown": repr(value) if shown is None else shown}


def run_fingerprint(*, settings: GuidanceSettings, height: int, width: int, seed: int, device: str,
                    target_kind: str, target: str, extractor: str, extractor_weights: str | None,
                    config: str, ckpt: str, files: list[str] = (), options: dict | None = None) -> dict:
    """What must not change between a run and its resumption, field by field. Each entry is
    {"id": what is compared, "shown": how an error message shows it}. `device` is the device
    type ("cpu", "cuda"): generator states do not carry over between types, while another GPU
    of the same kind may continue a run."""
    fp = {}
    for f in fields(GuidanceSettings):
        value = getattr(settings, f.name)
        value = list(value) if isinstance(value, tuple) else value
        fp[SETTING_FLAGS.get(f.name, f.name)] = _entry(value, " ".join(map(str, value))
                                                       if isinstance(value, list) else None)
    fp["--H"], fp["--W"], fp["--seed"] = _entry(height), _entry(width), _entry(seed)
    fp["--device"] = _entry(device)
    if target_kind in ("image", "features"):
        digest = sha256_file(Path(target))
        fp["the target (--prompt)"] = _entry([target_kind, digest],
                                             f"the {target_kind} file {target!r} (sha256 {digest[:12]})")
    else:
        # Text, or an expression: its text and the contents of the files it reads.
        digests = [sha256_file(Path(f)) for f in files]
        fp["the target (--prompt)"] = _entry([target_kind, target, digests], f"the {target_kind} {target!r}"
                                             + (" (or a file it reads)" if files else ""))
    for name, value in (options or {}).items():
        fp[name] = _entry(value)
    fp["the target model"] = _entry(extractor)
    if extractor_weights and Path(extractor_weights).is_file():
        ident = quick_file_id(Path(extractor_weights))
        fp["--extractor_weights"] = _entry(ident, f"{extractor_weights!r} ({ident})")
    elif extractor_weights:   # a tag of the library, or "random"
        fp["--extractor_weights"] = _entry(extractor_weights)
    else:
        fp["--extractor_weights"] = _entry(None, "the library's default weights")
    digest = sha256_file(Path(config))
    fp["--config"] = _entry(digest, f"{config!r} (sha256 {digest[:12]})")
    ident = quick_file_id(Path(ckpt))
    fp["--ckpt"] = _entry(ident, f"{ckpt!r} ({ident})")
    return fp


def fingerprint_differences(saved: dict, now: dict) -> list[str]:
    """One line per field that differs: "<field> is <saved> in the saved state but <now> now"."""
    out = []
    for name in list(saved) + [n for n in now if n not in saved]:
        old, new = saved.get(name), now.get(name)
        if old is None or new is None:
            out.append(f"{name} is {'unset' if old is None else old['shown']} in the saved state "
                       f"but {'unset' if new is None else new['shown']} now")
        elif json.dumps(old["id"]) != json.dumps(new["id"]):
            out.append(f"{name} is {old['shown']} in the saved state but {new['shown']} now")
    return out


# --- what a folder holds ----------------------------------------------------------------------
def folder_status(folder: Path) -> tuple[str, str]:
    """→ (status, detail). status: "new" (missing or no run in it), "finished", "interrupted"
    (a resume state, or metrics.json saying the run did not finish)."""
    metrics_path, state_path = folder / "metrics.json", folder / STATE_FILE
    if metrics_path.is_file():
        try:
            finished = json.loads(metrics_path.read_text()).get("finished", True) is not False
        except (ValueError, AttributeError, OSError, UnicodeDecodeError):
            finished = True  # unreadable: treat as a finished run, so it is not clobbered
        if finished:
            return "finished", metrics_path.name
    if state_path.is_file():
        return "interrupted", state_path.name
    if metrics_path.is_file():
        return "interrupted", f"{metrics_path.name} says the run did not finish, and there is no {STATE_FILE}"
    if (folder / "out_img.png").is_file():
        return "finished", "out_img.png"   # e.g. a finished run of the reference code
    return "new", ""
