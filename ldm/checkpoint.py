"""Loading checkpoints without trusting them.

Threat model: checkpoints (and the extractor weights and feature files next to them) come from
strangers. A `.ckpt`/`.pt`/`.pth` is a pickle, and a pickle can call anything it names.
`.safetensors` holds raw tensors and is always safe. Every pickle is read by PyTorch's own
restricted unpickler, `torch.load(weights_only=True)`: tensors, plain containers and numbers
only; it refuses TorchScript archives itself (never dispatching to `torch.jit.load`) and reads
legacy (torch < 1.6) and compressed archives the way torch does.

Real SD v1 checkpoints also hold a few non-tensor objects (PyTorch Lightning's `ModelCheckpoint`
class as a dict key, numpy scalars in its state). Those, and only those, are admitted as inert
stand-ins registered under their exact names (`torch.serialization.safe_globals`): the stand-in
keeps its arguments and state as data and never builds the real object, so loading never
imports Lightning and never builds a numpy object from a file. Anything else a pickle names is
refused by torch with the global's name in our error.
"""
from __future__ import annotations

import _compat_pickle
import io
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

SD_V1_IGNORABLE_KEYS = ("model_ema.decay", "model_ema.num_updates",
                        "cond_stage_model.transformer.text_model.embeddings.position_ids")
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_LIST_LIMIT = 20
_ZIP_MAGIC = b"PK\x03\x04"
# What torch < 1.6 wrote first: pickle protocol 2 of the magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


class CheckpointError(Exception):
    """A checkpoint could not be loaded (corrupt, unsupported, unsafe or not matching)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle names or builds something the weights-only loader refuses; nothing ran."""


class TorchScriptRefused(UnsafeCheckpointError):
    """The file is a TorchScript archive: loading one runs code from it."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys, shapes, dtypes or values do not fit the model."""


# --- inert stand-ins for the non-tensor objects of real SD v1 checkpoints --------------------------

class InertObject:
    """A stand-in for a non-tensor object of a checkpoint: what the pickle passes to it (a call's
    arguments, a BUILD state) is kept as data; nothing is imported or called."""

    global_name = "?"

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<inert stand-in for {self.global_name}>"


class ModelCheckpointStandIn(InertObject):
    """PyTorch Lightning's ModelCheckpoint callback class (a key of the checkpoint's "callbacks")."""

    global_name = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


# numpy type codes of plain numbers; an object dtype ("O8") would make `scalar` read a pointer.
_NUMBER_CODES = {f"{kind}{size}" for kind in "iu" for size in (1, 2, 4, 8)} | {
    "b1", "f2", "f4", "f8"}


class NumpyDtypeStandIn(InertObject):
    """numpy.dtype(code, align, copy) of a plain number type; anything else is refused."""

    global_name = "numpy.dtype"

    def __init__(self, code=None, *args):
        if code not in _NUMBER_CODES:
            raise UnsafeCheckpointError(f"the file builds numpy.dtype({code!r}): only plain number "
                                        "types are read from checkpoints")
        super().__init__(code, *args)

    def __setstate__(self, state):
        # (version, byte order, subarray, names, fields, elsize, alignment, flags): flags != 0
        # (or names, fields, a subarray) make a structured or object dtype.
        if not (isinstance(state, tuple) and len(state) == 8 and state[2:5] == (None,) * 3
                and state[7] == 0):
            raise UnsafeCheckpointError(f"the file sets the state {state!r} on numpy.dtype: only "
                                        "plain number types are read from checkpoints")
        self.state = state


class NumpyScalarStandIn(InertObject):
    """numpy's scalar(dtype, bytes): a number stored as raw bytes, kept as bytes."""

    global_name = "numpy.core.multiarray.scalar"

    def __init__(self, dtype=None, data=None, *args):
        if not isinstance(dtype, NumpyDtypeStandIn) or not isinstance(data, bytes) or args:
            raise UnsafeCheckpointError("the file calls numpy's scalar() with something other "
                                        "than a plain number type and its bytes")
        super().__init__(dtype, data)


STAND_INS = {cls.global_name: cls for cls in (ModelCheckpointStandIn, NumpyDtypeStandIn,
                                               NumpyScalarStandIn)}
# numpy 2 pickles name the scalar function and float dtypes under numpy._core / numpy.dtypes.
STAND_INS["numpy._core.multiarray.scalar"] = NumpyScalarStandIn
STAND_INS["numpy.dtypes.Float64DType"] = NumpyDtypeStandIn


def _safe_globals():
    return torch.serialization.safe_globals([(cls, name) for name, cls in STAND_INS.items()])


# --- reading files ----------------------------------------------------------------------------

def _corrupt(path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; the file is truncated or corrupt, re-download it")


def _zip_layout(path: Path) -> bool:
    """Check a torch zip archive before torch reads it; → whether it can be memory-mapped.

    Python's zipfile and torch's reader must see the same records (an archive with two central
    directories shows each a different file), and only uncompressed archives are mapped (torch
    maps compressed records as raw bytes; without mmap it inflates them)."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
        records = torch._C.PyTorchFileReader(str(path)).get_all_records()
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError) as err:
        raise _corrupt(path, f"unreadable zip archive ({str(err).splitlines()[0]})") from None
    names = sorted(info.filename.partition("/")[2] for info in infos)
    if names != sorted(records):
        raise UnsafeCheckpointError(
            f"{path}: the archive's directories disagree (Python's zipfile and torch's reader see "
            "different files in it), which no file written by torch.save does; it was refused")
    return all(info.compress_type == zipfile.ZIP_STORED for info in infos)


def _py3_name(name: str) -> str:
    """A global as pickle protocol 2 writes it (`commands.Popen`) → its Python 3 name."""
    module, _, attr = name.rpartition(".")
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}"


def _named_globals(path: Path) -> tuple[list[str], list[str]]:
    """(globals the weights-only loader refuses, other non-torch globals) that a checkpoint's
    pickle names, read by torch's pickletools-based scanner (nothing is run)."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        from torch._weights_only_unpickler import get_globals_in_pkl  # the scanner behind it
        named = get_globals_in_pkl(io.BytesIO(
            torch._C.PyTorchFileReader(str(path)).get_record("data.pkl")))
    except Exception:  # noqa: BLE001 - only decorates the message
        return [], []
    refused = sorted({_py3_name(n) for n in unsafe if n not in STAND_INS})
    others = sorted({_py3_name(n) for n in named if not n.startswith(("torch.", "collections."))}
                    - set(refused) - set(STAND_INS))
    return refused, others


def _refusal(path: Path, err: Exception) -> CheckpointError:
    """Our error for what torch.load(weights_only=True) raised."""
    text = str(err)
    if "TorchScript" in text:
        return TorchScriptRefused(f"{path} is a TorchScript archive; loading one runs code from "
                                  "the file, so it is refused")
    if not isinstance(err, pickle.UnpicklingError):
        first = text.strip().splitlines()[0] if text.strip() else ""
        return _corrupt(path, f"torch cannot read it ({type(err).__name__}: {first})")
    refused, others = _named_globals(path)
    if refused:
        detail = f"it names {', '.join(refused)}, which a checkpoint of weights never needs"
    else:
        tail = text.split("WeightsUnpickler error:")[-1]
        detail = next((line.strip() for line in tail.splitlines() if line.strip()), text)
        if others:
            detail += f" (the pickle uses {', '.join(others)})"
    return UnsafeCheckpointError(
        f"{path} was refused by the weights-only loader: {detail}. Nothing in the file was "
        "run. If you trust where it came from, convert it once to .safetensors and load that.")


def load_pickled(path: Path):
    """The object stored in a torch checkpoint (zip or legacy), read with weights_only=True."""
    path = Path(path)
    with open(path, "rb") as f:
        start = f.read(32)
    head = start[:len(_LEGACY_MAGIC)]
    if not head:
        raise _corrupt(path, "empty file")
    if head.startswith(b"\x80") and head != _LEGACY_MAGIC and _LEGACY_MAGIC[2:] in start:
        raise CheckpointError(f"{path} is a legacy (torch < 1.6 format) checkpoint written with pickle "
                              f"protocol {head[1]}, which torch's weights-only loader cannot read (only "
                              "protocol 2); nothing in it was run. Where you trust it, save it again with "
                              "torch.save's defaults or as .safetensors")
    if not head.startswith(_ZIP_MAGIC) and head != _LEGACY_MAGIC:
        raise _corrupt(path, "not a torch checkpoint (neither torch's zip format nor its legacy format)")
    mmap = _zip_layout(path) if head.startswith(_ZIP_MAGIC) else False
    try:
        with _safe_globals(), warnings.catch_warnings():
            # torch warns it would dispatch a TorchScript archive to jit.load; with
            # weights_only it refuses it instead (our error below says so).
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except UnsafeCheckpointError as err:   # raised by a stand-in
        raise UnsafeCheckpointError(f"{path} was refused: {err}. Nothing in the file was run.") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged or refused files
        raise _refusal(path, err) from None


def load_state_dict(path, missing_hint: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or of a torch checkpoint (Lightning or plain)."""
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise CheckpointError(f"{path} is not a file")
        raise CheckpointNotFoundError(missing_hint or f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise _corrupt(path, f"invalid safetensors file ({e})") from e
    if suffix not in _TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: unsupported extension; expected .safetensors or "
                              + ", ".join(_TORCH_SUFFIXES))
    obj = load_pickled(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not (isinstance(obj, dict) and obj
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: no state_dict of tensors found (top level: {keys})")
    return dict(obj)


# --- checking a state dict against a model ------------------------------------------------------

def _listing(title: str, lines: list[str]) -> list[str]:
    out = [f"{title} ({len(lines)}):"] + [f"  {s}" for s in lines[:_LIST_LIMIT]]
    if len(lines) > _LIST_LIMIT:
        out.append(f"  ... and {len(lines) - _LIST_LIMIT} more")
    return out if lines else []


def _value_problems(own: dict, kept: dict) -> list[str]:
    """Keys whose file tensor cannot stand for the model's: integer/boolean (or complex) data
    for a floating-point tensor, or NaN/inf values."""
    problems = []
    for key, mine in own.items():
        theirs = kept.get(key)
        if theirs is None or not mine.is_floating_point():
            continue
        if not theirs.is_floating_point():
            problems.append(f"{key}: {theirs.dtype} in the file, but the model's tensor is "
                            f"{mine.dtype} (weights must be floating point)")
        elif theirs.numel() and not theirs.is_meta and not bool(torch.isfinite(theirs).all()):
            problems.append(f"{key}: holds NaN or inf values")
    return problems


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                     ignorable=SD_V1_IGNORABLE_KEYS, expected: str = "this model"
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state_dict without ignorable extras, names dropped); CheckpointMismatchError if the
    keys or shapes differ from `model` in any other way, or if a floating-point tensor of the
    model gets integer data or non-finite values. `expected` names the model in it."""
    own = model.state_dict()
    dropped = sorted(k for k in state_dict if k in ignorable and k not in own)
    kept = {k: v for k, v in state_dict.items() if k not in dropped}
    shape = lambda t: tuple(t.shape)  # noqa: E731
    missing = [f"{k} {shape(v)}" for k, v in own.items() if k not in kept]
    unexpected = [f"{k} {shape(v)}" for k, v in kept.items() if k not in own]
    wrong = [f"{k}: file {shape(kept[k])} vs model {shape(v)}"
             for k, v in own.items() if k in kept and kept[k].shape != v.shape]
    if missing or unexpected or wrong:
        summary = (f"this does not look like a checkpoint for {expected}: {len(missing)} "
                   f"missing, {len(unexpected)} unexpected, {len(wrong)} wrong-shape keys")
        raise CheckpointMismatchError("\n".join(
            [summary] + _listing("missing from the file", missing)
            + _listing("unexpected in the file", unexpected)
            + _listing("shape mismatches", wrong)))
    bad = _value_problems(own, kept)
    if bad:
        raise CheckpointMismatchError("\n".join(
            [f"the checkpoint's weights for {expected} cannot be used: {len(bad)} bad tensors"]
            + _listing("bad tensors", bad)))
    return kept, dropped


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
              ignorable=SD_V1_IGNORABLE_KEYS, expected: str = "this model") -> list[str]:
    """Strictly load `state_dict` into `model` (converting float dtypes); returns dropped keys."""
    kept, dropped = check_state_dict(model, state_dict, ignorable, expected)
    model.load_state_dict(kept, strict=True)
    return dropped
