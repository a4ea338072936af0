"""Safe, strict checkpoint loading: every pickle through torch.load(weights_only=True) with inert
stand-ins for the non-tensor objects of real SD v1 checkpoints; hostile files are refused with
the global's name and nothing runs; keys, shapes, dtypes and values are checked."""
import builtins
import io
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import (SD_V1_IGNORABLE_KEYS, CheckpointError, CheckpointMismatchError,
                            CheckpointNotFoundError, ModelCheckpointStandIn, NumpyScalarStandIn,
                            TorchScriptRefused, UnsafeCheckpointError, check_state_dict, load_into,
                            load_pickled, load_state_dict)
from sd_checkpoint import write_sd_v1_ckpt

REPO = Path(__file__).resolve().parents[1]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.register_buffer("scale", torch.tensor(0.18215))


def tiny_sd():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in Tiny().state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


class Payload:
    """Pickles as `reduce` (a callable and its arguments): what a hostile file contains."""

    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def saved(tmp_path, obj, name="evil.ckpt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def crafted(tmp_path, data: bytes) -> Path:
    """A torch zip checkpoint whose data.pkl is `data` (hand-written pickle opcodes)."""
    path = saved(tmp_path, {}, "crafted.ckpt")
    with zipfile.ZipFile(path) as zf:
        records = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in records.items():
            zf.writestr(name, data if name.endswith("/data.pkl") else blob)
    return path


# --- files that load ------------------------------------------------------------------------

def test_a_checkpoint_shaped_like_sd_v1_4_loads(tmp_path):
    sd = tiny_sd()
    path = tmp_path / "model.ckpt"
    write_sd_v1_ckpt(path, sd)
    reported = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in reported
    assert_same(load_state_dict(path), sd)
    whole = load_pickled(path)
    (key, state), = whole["callbacks"].items()
    assert key is ModelCheckpointStandIn                  # a stand-in class, never Lightning's
    assert isinstance(state["best_model_score"], NumpyScalarStandIn)   # never a numpy object
    assert state["best_model_score"].args[1] == struct.pack("<d", 0.125)
    assert whole["global_step"] == 470000


def test_loading_imports_nothing_on_the_files_behalf(tmp_path):
    path = tmp_path / "model.ckpt"
    write_sd_v1_ckpt(path, tiny_sd())
    code = (f"import sys; from ldm.checkpoint import load_state_dict; load_state_dict({str(path)!r}); "
            "assert not [m for m in sys.modules if 'lightning' in m], 'Lightning was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_plain_state_dict_and_parameters(tmp_path, suffix):
    model = Tiny()
    torch.save(model.state_dict(), tmp_path / f"a{suffix}")
    assert_same(load_state_dict(tmp_path / f"a{suffix}"), model.state_dict())
    torch.save(model.state_dict(keep_vars=True), tmp_path / f"b{suffix}")
    assert isinstance(load_state_dict(tmp_path / f"b{suffix}")["conv.weight"], torch.nn.Parameter)


def test_legacy_format_loads(tmp_path):
    """torch < 1.6's format (torchvision's older weight files) reads through weights_only."""
    sd = tiny_sd()
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert_same(load_state_dict(tmp_path / "old.pth"), sd)


def test_compressed_archive_loads_as_torch_loads_it(tmp_path):
    """Memory-mapping a deflated archive would read its compressed bytes as weights."""
    sd = {"w": torch.arange(64.0)}
    plain = saved(tmp_path, sd, "plain.pt")
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(tmp_path / "zipped.pt", "w",
                                                        zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    assert_same(load_state_dict(tmp_path / "zipped.pt"), sd)


def test_weights_only_environment_does_not_change_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / "model.ckpt"
    write_sd_v1_ckpt(path, tiny_sd())
    assert_same(load_state_dict(path), tiny_sd())


def test_safetensors_and_fp16(tmp_path):
    half = {k: v.half() for k, v in tiny_sd().items()}
    save_file(half, tmp_path / "half.safetensors")
    model = Tiny()
    assert load_into(model, load_state_dict(tmp_path / "half.safetensors")) == []
    assert model.conv.weight.dtype == torch.float32
    assert torch.equal(model.conv.weight, half["conv.weight"].float())


def test_no_state_dict_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_state_dict(saved(tmp_path, {"epoch": 3, "optimizer": {}}, "x.ckpt"))
    (tmp_path / "x.onnx").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="unsupported extension"):
        load_state_dict(tmp_path / "x.onnx")


# --- hostile files: refused with the global's name, nothing runs ---------------------------------

def payloads(marker: Path) -> dict:
    return {"posix.system": (os.system, (f"touch {marker}",)),
            "builtins.eval": (builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
            "builtins.exec": (builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
            "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],)),
            "argparse.Namespace": (__import__("argparse").Namespace, ())}


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "builtins.exec",
                                  "subprocess.Popen", "argparse.Namespace"])
def test_classic_payloads_are_refused_and_never_run(tmp_path, name):
    marker = tmp_path / "pwned"
    path = saved(tmp_path, {"state_dict": tiny_sd(), "x": Payload(payloads(marker)[name])})
    with pytest.raises(UnsafeCheckpointError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert name in message and str(path) in message and "Nothing in the file was run" in message
    assert not marker.exists()


def object_scalar_pickle() -> bytes:
    """numpy.dtype('O8', False, True), BUILD with the object flags, then
    numpy scalar(dtype, 8 bytes): the bytes would be read as a pointer to a Python object."""
    return pickle.dumps(Payload((np._core.multiarray.scalar, (np.dtype(object), b"\x41" * 8))),
                        protocol=2)


def test_numpy_object_dtype_is_refused_in_a_live_process(tmp_path):
    path = crafted(tmp_path, object_scalar_pickle())
    code = (f"from ldm.checkpoint import load_state_dict, UnsafeCheckpointError\n"
            f"try:\n    load_state_dict({str(path)!r})\nexcept UnsafeCheckpointError as e:\n"
            f"    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"the process died ({done.returncode}): {done.stderr[-2000:]}"
    assert "numpy.dtype('O8')" in done.stdout and "refused" in done.stdout


def test_numpy_dtype_made_an_object_dtype_by_its_state_is_refused(tmp_path):
    state = (3, "|", None, None, None, -1, -1, 63)          # the flags of an object dtype
    data = (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R"
            + pickle.dumps(state, protocol=2)[2:-1] + b"b.")
    with pytest.raises(UnsafeCheckpointError, match=r"numpy\.dtype"):
        load_state_dict(crafted(tmp_path, data))


def test_build_on_an_allowed_callable_is_refused(tmp_path):
    """BUILD on _codecs.encode (allowed for protocol-2 bytes) with a state would rewrite it."""
    import _codecs
    before = dict(getattr(_codecs.encode, "__dict__", {}))
    data = b"\x80\x02c_codecs\nencode\n}X\x04\x00\x00\x00evilK\x01sb."
    with pytest.raises(UnsafeCheckpointError, match="encode"):
        load_state_dict(crafted(tmp_path, data))
    assert dict(getattr(_codecs.encode, "__dict__", {})) == before


def torchscript_bytes(tmp_path) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(torch.nn.ReLU()), str(tmp_path / "scripted.pt"))
    return (tmp_path / "scripted.pt").read_bytes()


def polyglot(torch_view: bytes) -> bytes:
    """`torch_view`'s records followed by a harmless zip whose end record points into them:
    Python's zipfile (which corrects offsets for prepended data) sees the harmless files, torch's
    reader (which does not) sees `torch_view`'s, e.g. a TorchScript archive's constants.pkl."""
    end = torch_view.rfind(b"PK\x05\x06")
    count, cd_size, cd_offset = struct.unpack("<HII", torch_view[end + 10:end + 20])
    names = [f"h/{k}" for k in range(count)]
    local = sum(30 + len(n) for n in names)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for k, name in enumerate(names):
            info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
            if k == count - 1:   # the same central-directory size as torch_view's
                info.comment = b"c" * (cd_size - sum(46 + len(n) for n in names))
            zf.writestr(info, b"x" * (cd_offset - local) if k == 0 else b"")
    return torch_view[:cd_offset + cd_size] + buffer.getvalue()


def test_polyglot_zip_hiding_torchscript_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "polyglot.ckpt"
    path.write_bytes(polyglot(torchscript_bytes(tmp_path)))
    assert "constants.pkl" in torch._C.PyTorchFileReader(str(path)).get_all_records()
    assert not any("constants" in n for n in zipfile.ZipFile(path).namelist())
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("dispatched to jit.load"))
    with pytest.raises(UnsafeCheckpointError, match="directories disagree"):
        load_state_dict(path)


def test_torchscript_archive_is_refused_by_torch(tmp_path, monkeypatch):
    path = tmp_path / "scripted.pt"
    path.write_bytes(torchscript_bytes(tmp_path))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("dispatched to jit.load"))
    with pytest.raises(TorchScriptRefused, match="TorchScript"):
        load_state_dict(path)


# --- broken files ---------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "safetensors"])
def test_damaged_files_give_a_readable_error(tmp_path, damage):
    if damage == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(tiny_sd(), path)
    else:
        path = tmp_path / "model.ckpt"
        write_sd_v1_ckpt(path, tiny_sd())
    blob = path.read_bytes()
    cut = {"random": np.random.default_rng(0).bytes(4096), "empty": b""}
    path.write_bytes(cut.get(damage, blob[: len(blob) // 2]))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_state_dict(path)
    assert str(path) in str(err.value)
    assert not isinstance(err.value, UnsafeCheckpointError)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="download sd-v1-4.ckpt first") as err:
        load_state_dict(tmp_path / "nope.ckpt", missing_hint="download sd-v1-4.ckpt first")
    assert isinstance(err.value, FileNotFoundError)


# --- matching keys, dtypes and values ---------------------------------------------------------

def test_ignorable_keys_are_dropped_and_reported():
    sd = {**tiny_sd(), "model_ema.decay": torch.tensor(0.9999),
          "model_ema.num_updates": torch.tensor(7)}
    kept, dropped = check_state_dict(Tiny(), sd)
    assert dropped == ["model_ema.decay", "model_ema.num_updates"]
    assert kept.keys() == tiny_sd().keys()


@pytest.mark.parametrize("problem", ["unexpected", "missing", "shape"])
def test_mismatches_name_the_key(problem):
    sd = tiny_sd()
    if problem == "unexpected":
        sd["first_stage_model.extra.weight"], key = torch.zeros(2), "first_stage_model.extra"
    elif problem == "missing":
        del sd["norm.bias"]
        key = "norm.bias"
    else:
        sd["conv.weight"], key = torch.zeros(4, 3, 5, 5), "conv.weight: file (4, 3, 5, 5)"
    with pytest.raises(CheckpointMismatchError, match="does not look like") as err:
        load_into(Tiny(), sd, expected="configs/tiny")
    assert key in str(err.value) and "configs/tiny" in str(err.value)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.uint8])
def test_integer_or_boolean_weights_are_refused(dtype):
    sd = tiny_sd()
    sd["conv.weight"] = sd["conv.weight"].to(dtype)
    with pytest.raises(CheckpointMismatchError, match=f"conv.weight: {dtype}"):
        load_into(Tiny(), sd)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(value):
    sd = tiny_sd()
    sd["norm.weight"][1] = value
    with pytest.raises(CheckpointMismatchError, match="norm.weight: holds NaN or inf"):
        load_into(Tiny(), sd)


def test_ignorable_key_is_checked_when_the_model_has_it():
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert pos in SD_V1_IGNORABLE_KEYS
    model = cur = torch.nn.Module()
    for part in pos.split(".")[:-1]:
        cur.add_module(part, torch.nn.Module())
        cur = getattr(cur, part)
    cur.register_buffer("position_ids", torch.arange(77)[None])
    assert check_state_dict(model, {pos: torch.arange(77)[None]})[1] == []
    with pytest.raises(CheckpointMismatchError, match=r"1 missing(.|\n)*position_ids \(1, 77\)"):
        check_state_dict(model, {})


def test_long_listings_are_cut():
    sd = {**tiny_sd(), **{f"junk.{i}": torch.zeros(1) for i in range(25)}}
    with pytest.raises(CheckpointMismatchError) as err:
        check_state_dict(Tiny(), sd)
    assert "0 missing, 25 unexpected, 0 wrong-shape" in str(err.value)
    assert "... and 5 more" in str(err.value)
