"""Loading Stable Diffusion checkpoints without trusting them.

Threat model: checkpoints are big files that people download from strangers. A ``.ckpt``
is a zip around a pickle, and a plain ``torch.load(..., weights_only=False)`` will call any
function the pickle names (``os.system``, ``eval``, ...). ``.safetensors`` holds raw tensors
and is always safe. For pickles we use our own Unpickler:

* a short allow-list of globals (tensor rebuilders, plain containers, dtypes, numpy
  scalars) resolves to the real objects;
* every other global (Lightning callbacks, ``argparse.Namespace``, ...) becomes an inert
  placeholder class. It can be a dict key, be created empty (NEWOBJ) and be filled
  (BUILD), which is all a Lightning checkpoint needs, but *calling* it (REDUCE, i.e. the
  classic ``__reduce__`` payload) raises ``UnsafeCheckpointError`` before anything runs.

No module is ever imported by name on the file's behalf, so loading never imports
pytorch_lightning or anything else.
"""
from __future__ import annotations

import _compat_pickle
import codecs
import collections
import pickle
import types
import zipfile
from pathlib import Path

import torch

SD_V1_IGNORABLE_KEYS = ("model_ema.decay", "model_ema.num_updates",
                        "cond_stage_model.transformer.text_model.embeddings.position_ids")
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_LIST_LIMIT = 20
# What torch < 1.6 wrote first: pickle protocol 2 of the magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


class CheckpointError(Exception):
    """A checkpoint could not be loaded (corrupt, unsupported, unsafe or not matching)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle wanted to call something that is not on the allow-list; nothing ran."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not fit the model."""


def _fresh(fn):
    # Python functions are mutable (BUILD could set their __defaults__ for the rest of the
    # process), so the pickle only ever gets a throw-away wrapper around them.
    return lambda *args: fn(*args)


def _latin1_encode(text, encoding):
    # Protocol 2 stores bytes as _codecs.encode(str, "latin1"); no other codec is needed.
    if encoding != "latin1" or not isinstance(text, str):
        raise UnsafeCheckpointError(f"refused _codecs.encode(..., {encoding!r})")
    return codecs.encode(text, "latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    import numpy  # torch already depends on it
    try:
        from numpy._core.multiarray import scalar as np_scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar as np_scalar
    allowed = {
        # how every tensor (and nn.Parameter, with or without attributes) is rebuilt
        ("torch._utils", "_rebuild_tensor_v2"): _fresh(torch._utils._rebuild_tensor_v2),
        ("torch._utils", "_rebuild_parameter"): _fresh(torch._utils._rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"):
            _fresh(torch._utils._rebuild_parameter_with_state),
        # plain values found in state_dicts, hyper_parameters and optimizer/loop states
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("_codecs", "encode"): _latin1_encode,
        # numpy scalars (e.g. a best score saved as numpy.float64), numpy 1.x and 2.x names
        ("numpy", "dtype"): numpy.dtype,
        ("numpy.core.multiarray", "scalar"): np_scalar,
        ("numpy._core.multiarray", "scalar"): np_scalar,
    }
    allowed.update({("torch", name): v for name, v in vars(torch).items()
                    if isinstance(v, torch.dtype)})
    # torch.FloatStorage & co. never reach find_class: torch's own Unpickler wrapper
    # turns any name containing "Storage" into a harmless StorageType first.
    return allowed


def _refuse(name: str):
    raise UnsafeCheckpointError(
        f"the checkpoint tries to call {name}(...) while loading, which is how pickle files "
        "run code. The file was refused and nothing was executed. If you trust where it "
        "came from, convert it once to .safetensors and load that instead.")


class _PlaceholderMeta(type):
    def __call__(cls, *args, **kwargs):  # REDUCE: the pickle calls the class
        _refuse(cls._global_name)


class _Placeholder(metaclass=_PlaceholderMeta):
    _global_name = "?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ: cls.__new__(cls, *args) bypasses __call__
        return object.__new__(cls)

    def __setstate__(self, state):  # BUILD: keep the state, never interpret it
        self.__dict__["_pickled_state"] = state

    def __call__(self, *args, **kwargs):
        _refuse(f"an instance of {self._global_name}")

    def __repr__(self):
        return f"<{type(self).__name__}>"


class _SafeUnpickler(pickle.Unpickler):
    _allowed: dict | None = None

    def find_class(self, module, name):
        # Protocol 2 writes Python 2 names (__builtin__, commands.Popen): map them back the
        # way the stdlib unpickler does, so the allow-list and error messages see real names.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if self._allowed is None:  # per load, so the function wrappers are fresh each time
            self._allowed = _allowed_globals()
        if (module, name) in self._allowed:
            return self._allowed[module, name]
        full = f"{module}.{name}"
        return _PlaceholderMeta(f"Placeholder[{full}]", (_Placeholder,), {"_global_name": full})


def _refuse_legacy(*args, **kwargs):
    raise CheckpointError("legacy (pre-zip) torch checkpoints are not supported")


# torch.load only uses pickle_module.Unpickler (zip files), .load (legacy files) and __name__.
_SAFE_PICKLE = types.ModuleType("ldm.checkpoint.safe_pickle")
_SAFE_PICKLE.Unpickler = _SafeUnpickler
_SAFE_PICKLE.load = _refuse_legacy


def _corrupt(path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; the file is truncated or corrupt, re-download it")


def _load_pickled(path: Path):
    """Whole object stored in a torch zip checkpoint, unpickled with the allow-list."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not head:
        raise _corrupt(path, "empty file")
    if head == _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: legacy torch checkpoint (saved by torch < 1.6) is not "
                              "supported; convert it to .safetensors with a trusted tool")
    if not head.startswith(b"PK\x03\x04"):
        raise _corrupt(path, "not a torch zip checkpoint")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise _corrupt(path, f"unreadable zip archive ({e})") from e
    if any(n.endswith("/constants.pkl") for n in names):  # torch.load would run jit.load
        raise CheckpointError(f"{path}: TorchScript archives are not supported")
    if not any(n.endswith("data.pkl") for n in names):
        raise _corrupt(path, "zip archive without data.pkl")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True,
                          pickle_module=_SAFE_PICKLE)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: {e}") from None
    except CheckpointError:
        raise
    except Exception as e:  # zip/pickle/storage errors from damaged data
        raise _corrupt(path, f"failed to unpickle ({type(e).__name__}: {e})") from e


def load_state_dict(path, missing_hint: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or of a torch zip checkpoint (Lightning or plain)."""
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
    obj = _load_pickled(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not (isinstance(obj, dict) and obj
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: no state_dict of tensors found (top level: {keys})")
    return dict(obj)


def _listing(title: str, lines: list[str]) -> list[str]:
    out = [f"{title} ({len(lines)}):"] + [f"  {s}" for s in lines[:_LIST_LIMIT]]
    if len(lines) > _LIST_LIMIT:
        out.append(f"  ... and {len(lines) - _LIST_LIMIT} more")
    return out if lines else []


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                     ignorable=SD_V1_IGNORABLE_KEYS, expected: str = "this model"
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state_dict without ignorable extras, names dropped); CheckpointMismatchError if the
    keys or shapes differ from `model` in any other way. `expected` names the model in it."""
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
    return kept, dropped


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
              ignorable=SD_V1_IGNORABLE_KEYS, expected: str = "this model") -> list[str]:
    """Strictly load `state_dict` into `model` (converting dtypes); returns dropped keys."""
    kept, dropped = check_state_dict(model, state_dict, ignorable, expected)
    model.load_state_dict(kept, strict=True)
    return dropped
