import argparse
import builtins
import os
import pickle
import subprocess
import sys
import zipfile


import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import (SD_V1_IGNORABLE_KEYS, CheckpointError, CheckpointMismatchError,
                            CheckpointNotFoundError, UnsafeCheckpointError, _load_pickled,
                            check_state_dict, load_into, load_state_dict)
from lightning_fake import PL_MODULE, PL_NAMES, fake_lightning



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




def write_lightning_ckpt(path, state_dict, extra=None):
    with fake_lightning() as ModelCheckpoint:
        ckpt = {"epoch": 1, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                "state_dict": state_dict,
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.12),
                                                "best_model_path": "/logs/epoch=1.ckpt"}},
                "hyper_parameters": {"callback": ModelCheckpoint(),
                                     "args": argparse.Namespace(lr=1e-4, seed=23),
                                     "score": np.float64(0.5), "tags": {"a", "b"},
                                     "size": torch.Size([4, 64]), "device": torch.device("cpu"),
                                     "dtype": torch.float16},
                **(extra or {})}
        torch.save(ckpt, path)


def replace_pickle(path, data: bytes):
    """Rewrite the data.pkl record of the torch zip checkpoint at `path`."""
    with zipfile.ZipFile(path) as zf:
        records = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in records.items():
            zf.writestr(name, data if name.endswith("/data.pkl") else blob)


def crafted_ckpt(tmp_path, data: bytes):
    path = tmp_path / "crafted.ckpt"
    torch.save({}, path)
    replace_pickle(path, data)
    return path


# --- reading files --------------------------------------------------------------------------

def test_lightning_ckpt_round_trip_without_lightning(tmp_path):
    sd = tiny_sd()
    path = tmp_path / "model.ckpt"
    write_lightning_ckpt(path, sd)
    assert_same(load_state_dict(path), sd)
    assert not any(n in sys.modules for n in PL_NAMES)

    whole = _load_pickled(path)
    (key, cb_state), = whole["callbacks"].items()
    assert key.__name__ == f"Placeholder[{PL_MODULE}.ModelCheckpoint]"
    assert torch.equal(cb_state["best_model_score"], torch.tensor(0.12))
    hp = whole["hyper_parameters"]
    assert hp["callback"]._pickled_state == {"monitor": "val/loss",
                                             "best_model_path": "/logs/last.ckpt"}
    assert type(hp["args"]).__name__ == "Placeholder[argparse.Namespace]"
    assert hp["args"]._pickled_state == {"lr": 1e-4, "seed": 23}
    assert hp["score"] == 0.5 and hp["tags"] == {"a", "b"} and hp["dtype"] is torch.float16
    assert hp["size"] == torch.Size([4, 64]) and hp["device"] == torch.device("cpu")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_plain_state_dict_and_parameters(tmp_path, suffix):
    model = Tiny()
    torch.save(model.state_dict(), tmp_path / f"a{suffix}")  # OrderedDict + _metadata BUILD
    assert_same(load_state_dict(tmp_path / f"a{suffix}"), model.state_dict())
    params = model.state_dict(keep_vars=True)
    params["conv.weight"].note = "parameters with attributes use another rebuild function"
    torch.save(params, tmp_path / f"b{suffix}")
    loaded = load_state_dict(tmp_path / f"b{suffix}")
    assert isinstance(loaded["conv.weight"], torch.nn.Parameter)
    assert torch.equal(loaded["conv.weight"], model.conv.weight)


def test_safetensors_round_trip(tmp_path):
    sd = tiny_sd()
    save_file(sd, tmp_path / "model.safetensors")
    assert_same(load_state_dict(tmp_path / "model.safetensors"), sd)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_fp16_file_loads_into_fp32_model(tmp_path, suffix):
    half = {k: v.half() for k, v in tiny_sd().items()}
    path = tmp_path / f"half{suffix}"
    save_file(half, path) if suffix == ".safetensors" else write_lightning_ckpt(path, half)
    model = Tiny()
    assert load_into(model, load_state_dict(path)) == []
    assert model.conv.weight.dtype == torch.float32
    assert torch.equal(model.conv.weight, half["conv.weight"].float())


def test_no_state_dict_and_unknown_suffix(tmp_path):
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_state_dict(tmp_path / "x.ckpt")
    (tmp_path / "x.onnx").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="unsupported extension"):
        load_state_dict(tmp_path / "x.onnx")


# --- hostile files --------------------------------------------------------------------------

class Payload:
    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def payloads(marker):
    return {"os.system": (os.system, (f"touch {marker}",)),
            "builtins.eval": (builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
            "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],))}


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_malicious_reduce_is_refused_and_never_runs(tmp_path, kind):
    # Sanity: the same payload does run under a plain unpickler.
    probe = tmp_path / "probe"
    obj = pickle.loads(pickle.dumps(Payload(payloads(probe)[kind])))
    if isinstance(obj, subprocess.Popen):
        obj.wait()
    assert probe.exists()

    marker = tmp_path / "pwned"
    func, args = payloads(marker)[kind]
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_sd(), "hyper_parameters": {"x": Payload((func, args))}}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_state_dict(path)
    msg = str(err.value)
    assert f"{func.__module__}.{func.__qualname__}" in msg and str(path) in msg
    assert "nothing was executed" in msg and ".safetensors" in msg
    assert not marker.exists()


def test_calling_a_placeholder_instance_is_refused(tmp_path):
    # NEWOBJ builds an inert os._wrap_close instance, then REDUCE tries to call it.
    data = b"\x80\x02cos\n_wrap_close\n)\x81X\x02\x00\x00\x00hi\x85R."
    with pytest.raises(UnsafeCheckpointError, match="os._wrap_close"):
        load_state_dict(crafted_ckpt(tmp_path, data))


def test_build_cannot_tamper_with_allowed_functions(tmp_path):
    # BUILD on the global itself with slot state {"__defaults__": (42,)}.
    before = torch._utils._rebuild_tensor_v2.__defaults__
    data = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__"
            b"K*\x85s\x86b.")
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_state_dict(crafted_ckpt(tmp_path, data))
    assert torch._utils._rebuild_tensor_v2.__defaults__ == before


def test_only_latin1_codec_is_allowed(tmp_path):
    data = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(UnsafeCheckpointError, match="zlib"):
        load_state_dict(crafted_ckpt(tmp_path, data))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # jit.script/save are deprecated
def test_torchscript_archive_is_refused(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.ReLU()), tmp_path / "scripted.pt")
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_state_dict(tmp_path / "scripted.pt")


# --- broken files ---------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "safetensors"])
def test_damaged_files_give_a_readable_error(tmp_path, damage):
    if damage == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(tiny_sd(), path)
    else:
        path = tmp_path / "model.ckpt"
        write_lightning_ckpt(path, tiny_sd())
    blob = path.read_bytes()
    cut = {"random": np.random.default_rng(0).bytes(4096), "empty": b""}
    path.write_bytes(cut.get(damage, blob[: len(blob) // 2]))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_state_dict(path)
    assert str(path) in str(err.value)
    assert not isinstance(err.value, UnsafeCheckpointError)


def test_legacy_format_is_reported(tmp_path):
    torch.save(tiny_sd(), tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        load_state_dict(tmp_path / "old.ckpt")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="download sd-v1-4.ckpt first") as err:
        load_state_dict(tmp_path / "nope.ckpt", missing_hint="download sd-v1-4.ckpt first")
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(CheckpointNotFoundError, match="nope.ckpt"):
        load_state_dict(tmp_path / "nope.ckpt")


# --- matching keys --------------------------------------------------------------------------

def test_ignorable_keys_are_dropped_and_reported():
    sd = {**tiny_sd(), "model_ema.decay": torch.tensor(0.9999),
          "model_ema.num_updates": torch.tensor(7)}
    kept, dropped = check_state_dict(Tiny(), sd)
    assert dropped == ["model_ema.decay", "model_ema.num_updates"]
    assert kept.keys() == tiny_sd().keys()
    model = Tiny()
    assert load_into(model, sd) == dropped
    assert torch.equal(model.conv.bias, sd["conv.bias"])


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


def test_ignorable_key_is_checked_when_the_model_has_it():
    # Some transformers versions keep position_ids as a persistent buffer: then it is a
    # real key and must be present with the right shape.
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert pos in SD_V1_IGNORABLE_KEYS
    model = cur = torch.nn.Module()
    for part in pos.split(".")[:-1]:
        cur.add_module(part, torch.nn.Module())
        cur = getattr(cur, part)
    cur.register_buffer("position_ids", torch.arange(77)[None])
    assert check_state_dict(model, {pos: torch.arange(77)[None]})[1] == []
    with pytest.raises(CheckpointMismatchError, match=r"1 missing(.|\n)*position_ids \(1, 77\)"):
        check_state_dict(model, {})  # in the model, so leaving it out is an error
    with pytest.raises(CheckpointMismatchError, match="position_ids: file"):
        check_state_dict(model, {pos: torch.arange(76)[None]})


def test_long_listings_are_cut():
    sd = {**tiny_sd(), **{f"junk.{i}": torch.zeros(1) for i in range(25)}}
    with pytest.raises(CheckpointMismatchError) as err:
        check_state_dict(Tiny(), sd)
    msg = str(err.value)
    assert "0 missing, 25 unexpected, 0 wrong-shape" in msg and "... and 5 more" in msg
