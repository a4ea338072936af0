"""The resume state file, `<folder>/resume_state.safetensors`: tensors only (read back with
safetensors, nothing is ever unpickled) plus JSON strings in the file's metadata.

    tensors   the SamplerState's row tensors by name (z, history, best_prev_score, do_backward,
              [best_prev_z]), generator.<b> (uint8 generator states), [best.<b>.image]
    metadata  "format": "feature-space-decoder/resume-state", "version": "1",
              "sampler": JSON of the SamplerState's other fields (k, j, timestep, iterations,
                         history_count, guard_events, batch, best records without their images),
              "run":     JSON of the command line's bookkeeping (fingerprint, log length, argv, ...)

A state is validated in full when it is read (types, dtypes, shapes, finite values), so a
damaged or hand-edited file is refused before anything in its folder changes.
"""
from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import torch

from ldm.files import atomic_write, write_safetensors
from ldm.models.diffusion.sampler_state import SamplerState

FORMAT = "feature-space-decoder/resume-state"
VERSION = "1"
# Bytes of torch.Generator.get_state(): CPU (Mersenne Twister) and CUDA (Philox seed, offset).
GENERATOR_STATE_BYTES = (5056, 16)


class RunStateError(Exception):
    """A resume state that cannot be read, is damaged, or does not belong to this run."""


def save_state(path: Path, state: SamplerState, run: dict) -> None:
    """Write `state` and the caller's `run` dict (JSON-able) atomically to `path`. On an error
    (a full disk) the previous state stays as it was and RunStateError says so."""
    tensors, sampler = state.to_parts()
    # json writes floats with repr, which reads back bit for bit (also -Infinity and NaN).
    metadata = {"format": FORMAT, "version": VERSION, "sampler": json.dumps(sampler),
                "run": json.dumps(run)}
    try:
        atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, metadata))
    except OSError as err:
        kept = "the previous resume state is intact" if path.is_file() else "no resume state was kept"
        raise RunStateError(f"could not write the resume state {path} ({err.strerror or err}); "
                            f"{kept}") from None


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


def peek_run(path: Path) -> dict:
    """The `run` dict of a state file plus its sampler position ("sampler"), from its header
    only (one open file: safe while another process replaces the file)."""
    with open(path, "rb") as f:
        metadata = _metadata(_read_header(f, path), path)
    try:
        return {**json.loads(metadata["run"]), "sampler": json.loads(metadata["sampler"])}
    except (KeyError, ValueError, TypeError) as err:
        raise RunStateError(f"{path} is an incomplete resume state ({err})") from None


def load_state(path: Path) -> tuple[SamplerState, dict]:
    """→ (SamplerState on the CPU, the `run` dict). RunStateError if unreadable or damaged.

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
        state = SamplerState.from_parts(tensors, sampler)
        if not isinstance(run, dict):
            raise TypeError("the run record is not a JSON object")
    except (KeyError, TypeError, ValueError) as err:
        raise RunStateError(f"{path} is an incomplete resume state ({type(err).__name__}: {err})") from err
    problems = state_problems(state)
    if problems:
        raise RunStateError(f"{path} is a damaged resume state: " + "; ".join(problems))
    return state, run


def _tensor_problem(name: str, x, dtype: torch.dtype, shape: tuple, finite: bool = True) -> str | None:
    if not isinstance(x, torch.Tensor) or x.dtype != dtype:
        return f"{name} is not a {dtype} tensor"
    if len(x.shape) != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        return f"{name} has shape {tuple(x.shape)}, expected {tuple('*' if s is None else s for s in shape)}"
    if finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        return f"{name} holds NaN or inf"
    return None


# The command line's run record: the entries resuming reads, and what each must be.
RUN_ENTRIES = {"log_bytes": lambda v: type(v) is int and v >= 0,
               "elapsed_s": lambda v: type(v) in (int, float) and 0 <= v < math.inf,
               "resumes": lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
               "argv": lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v),
               "run_options": lambda v: isinstance(v, (str, dict)),
               "fingerprint": lambda v: isinstance(v, dict)}


def run_problems(run: dict) -> list[str]:
    """What is wrong with the command line's run record of a state (`save_state`'s `run`) read
    from a file (empty if nothing)."""
    return [f"{name} is {run.get(name)!r:.60}" for name, valid in RUN_ENTRIES.items()
            if not valid(run.get(name))]


def state_problems(state: SamplerState) -> list[str]:
    """What is wrong with a state read from a file (empty if nothing): its own consistency;
    whether it fits a run's settings is `feature_guidance.check_state`'s question."""
    counts = {name: getattr(state, name) for name in SamplerState.counts()}
    problems = [f"{name} is {value!r}, not a count" for name, value in counts.items()
                if isinstance(value, bool) or not isinstance(value, int) or value < 0]
    batch, lengths = state.batch, state.list_lengths()
    if batch < 1 or set(lengths.values()) != {batch}:
        return problems + ["its lists disagree on the batch size (" + ", ".join(
            f"{n} {name}" for name, n in lengths.items()) + ")"]
    checks = state.row_checks()
    checks += [(f"generator.{b}", g, torch.uint8, (None,), False)
               for b, g in enumerate(state.generator_states)]
    checks += [(f"best.{b}.image", best.image, torch.float32, (3, None, None), True)
               for b, best in enumerate(state.best) if best.image is not None]
    problems += [p for p in (_tensor_problem(*c) for c in checks) if p]
    problems += [f"generator.{b} holds {g.numel()} bytes, not a generator's state "
                 f"({' or '.join(map(str, GENERATOR_STATE_BYTES))})"
                 for b, g in enumerate(state.generator_states)
                 if isinstance(g, torch.Tensor) and g.numel() not in GENERATOR_STATE_BYTES]
    if isinstance(state.best_prev_score, torch.Tensor) and bool(torch.isnan(state.best_prev_score).any()):
        problems.append("best_prev_score holds NaN")
    problems += [f"best.{b} has the score {best.score!r}" for b, best in enumerate(state.best)
                 if type(best.score) not in (int, float) or not best.score < math.inf
                 or (best.image is not None and best.score == -math.inf)]
    problems += [f"guard count {b} is {n!r}" for b, n in enumerate(state.guard_events)
                 if isinstance(n, bool) or not isinstance(n, int) or n < 0]
    if not problems and state.history_count > state.iterations:
        problems.append(f"{state.history_count} scores pushed in {state.iterations} iterations")
    return problems
