"""A trained decoder's file and record can change nothing but the ControlNet, and every damaged
one is one clear error before anything is built (issue 22): a decoder file that also carries base
weights, records with unknown, missing, mistyped or huge fields, records naming files elsewhere;
and the image files run folders and targets name (figures draw only the run's own files; only
raster formats are decoded; folders and FIFOs are not images)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError
from ldm.cli import main
from ldm.featinv import load_decoder
from ldm.featinv.decoder import METADATA_KEY, read_record
from ldm.images import ImageFileError, read_rgb
from ldm.run_folder import RunFolderError, load_run
from tiny_models import TinyExtractor, run_cli, tiny_args, write_tiny_featinv


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    return write_tiny_featinv(tmp_path_factory.mktemp("hostile_decoder"))


def rewritten(folder, tmp_path, change_tensors=None, change_record=None):
    """A copy of the tiny decoder with its tensors or its record (a dict, or raw text) changed."""
    with safe_open(str(folder / "decoder.safetensors"), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    if change_tensors:
        change_tensors(tensors)
    if change_record:
        record = json.loads(metadata[METADATA_KEY])
        changed = change_record(record)
        metadata[METADATA_KEY] = changed if isinstance(changed, str) else json.dumps(record)
    path = tmp_path / "decoder.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def with_base_weights(tensors):
    tensors["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 4, 3, 3)


RECORDS = [   # (change of the record, words of the error)
    (lambda r: r.update(surprise=1), "unknown fields ['surprise']"),
    (lambda r: r.pop("hint_shape"), "misses ['hint_shape']"),
    (lambda r: "[1, 2, 3]", "not a featinv-controlnet/1 record"),
    (lambda r: "{not json", "not a featinv-controlnet/1 record"),
    (lambda r: r.update(hint_shape=["8", 1, 1]), "hint_shape ['8', 1, 1]"),
    (lambda r: r.update(hint_shape=[8, 1, 1.5]), "hint_shape [8, 1, 1.5]"),
    (lambda r: r.update(hint_shape=[100000000, 1, 1]), "hint_shape [100000000, 1, 1]"),
    (lambda r: r.update(hint_shape=[8, -1, 1]), "h and w from 1 to 1024"),
    (lambda r: r.update(hint_hidden_channels=-16), "hint_hidden_channels -16"),
    (lambda r: r.update(hint_hidden_channels=10 ** 6), "hint_hidden_channels 1000000"),
    (lambda r: r.update(spatial="yes"), "spatial 'yes', of the wrong type"),
    (lambda r: r.update(sd_locked="no"), "sd_locked 'no', of the wrong type"),
    (lambda r: r.update(base_config="/etc/passwd"), "not one of this project's configs"),
    (lambda r: r.update(base_config="configs/../../../etc/passwd"), "not one of this project's configs"),
]


@pytest.mark.parametrize("change, message", [
    *RECORDS, ("tensors", "holds the ControlNet's tensors (control_model.*) only")],
    ids=[m for _, m in RECORDS] + ["base weights in the decoder"])
def test_decoder_files_change_nothing_but_the_controlnet(tiny_decoder, tmp_path, change, message):
    if change == "tensors":
        path, config = rewritten(tiny_decoder, tmp_path, change_tensors=with_base_weights), tiny_decoder / "tiny.yaml"
    else:
        path, config = rewritten(tiny_decoder, tmp_path, change_record=change), None
    with pytest.raises(CheckpointError) as raised:
        load_decoder(path, tiny_decoder / "tiny.ckpt", base_config=config)
    assert message in str(raised.value)


def with_unet_weights(tensors):
    tensors["model.diffusion_model.out.2.bias"] = torch.zeros(4)


def unlocked(record):
    record["sd_locked"] = False


def written_before_sd_locked(record):
    del record["sd_locked"]


@pytest.mark.parametrize("change_tensors, change_record, message", [
    (with_unet_weights, None, "holds the ControlNet's tensors (control_model.*) only"),
    (None, unlocked, "its record says it holds the ControlNet's and the UNet decoder half's tensors"),
    (with_unet_weights, unlocked, "model.diffusion_model.output_blocks.*"),
    (None, written_before_sd_locked, None)], ids=["UNet tensors in a locked file",
                                                  "unlocked record, no UNet tensors",
                                                  "unlocked record, a UNet tensor", "an older file"])
def test_a_decoder_file_holds_what_its_record_says(tiny_decoder, tmp_path, change_tensors,
                                                    change_record, message):
    """A locked decoder changes the ControlNet only, an unlocked one the UNet's whole decoder half
    too; a file from before `sd_locked` is a locked one."""
    path = rewritten(tiny_decoder, tmp_path, change_tensors, change_record)
    load = lambda: load_decoder(path, tiny_decoder / "tiny.ckpt", base_config=tiny_decoder / "tiny.yaml")  # noqa: E731
    if message is None:
        assert load()[1].sd_locked is True
        return
    with pytest.raises(CheckpointError) as raised:
        load()
    assert message in str(raised.value)


def test_a_records_extractor_weights_are_never_opened(tiny_decoder, tmp_path, monkeypatch):
    path = rewritten(tiny_decoder, tmp_path, change_record=lambda r: r.update(extractor_weights="/etc/passwd"))
    record = read_record(path)
    opened = []
    monkeypatch.setattr("ldm.featinv.decoder.build_extractor",
                        lambda spec, weights, **kw: opened.append(weights))
    record.build_extractor()
    assert opened == [None]


def test_a_decoder_with_base_weights_is_one_error_line(tiny_decoder, tmp_path, capsys):
    path = rewritten(tiny_decoder, tmp_path, change_tensors=with_base_weights)
    code, _, err = run_cli(TinyExtractor, tiny_args(tiny_decoder, tmp_path / "out", "--decoder", "featinv",
                                                    "--featinv_decoder", path, "--featinv_steps", "2"), capsys)
    assert code == 2 and err.startswith("error:") and "control_model.*" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.json").exists()


# --- image files ------------------------------------------------------------------------------

def postscript(path):
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n(x) print\nshowpage\n")
    return "not one of the formats read here (PNG, JPEG"


def truncated_jpeg(path):
    buffer = path.with_suffix(".full.jpg")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer)
    path.write_bytes(buffer.read_bytes()[:300])
    return "is not a readable image"


def folder(path):
    path.mkdir()
    return "is a folder, not an image file"


def fifo(path):
    os.mkfifo(path)
    return "is not a regular file, not an image file"


@pytest.mark.parametrize("make", [postscript, truncated_jpeg, folder, fifo])
def test_only_regular_raster_image_files_are_decoded(tmp_path, monkeypatch, make):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))   # a `gs` there would record its call
    (tmp_path / "bin").mkdir()
    gs = tmp_path / "bin" / "gs"
    gs.write_text(f"#!/bin/sh\necho > {tmp_path / 'ghostscript_ran'}\n")
    gs.chmod(0o755)
    path = tmp_path / "target.png"
    message = make(path)
    with pytest.raises(ImageFileError) as raised:
        read_rgb(path)
    assert message in str(raised.value)
    assert not (tmp_path / "ghostscript_ran").exists()


def test_32bit_integer_images_are_scaled_by_their_values(tmp_path):
    """8-bit data stored as 32-bit integers (as some tools write TIFFs) is the grey it shows."""
    Image.fromarray(np.full((8, 8), 128, dtype=np.int32)).save(tmp_path / "grey.tif")
    assert np.asarray(read_rgb(tmp_path / "grey.tif"))[0, 0].tolist() == [128, 128, 128]


@pytest.fixture(scope="module")
def finished_run(tiny_decoder, tmp_path_factory):
    run = tmp_path_factory.mktemp("figure") / "run"
    argv = tiny_args(tiny_decoder, run, "--optim_forward_guidance", "--optim_timesteps", "1")
    assert main(TinyExtractor, argv=argv) == 0
    load_run(run)   # as written: fine
    return run


@pytest.mark.parametrize("key, file", [("final", "../outside.png"), ("final", "/etc/passwd"),
                                       ("best", "sub/x.png"), ("final", ""), ("best", 7),
                                       ("final", "link.png")])
def test_figures_draw_only_the_run_folders_own_images(finished_run, tmp_path, key, file):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    (run / "link.png").symlink_to(tmp_path / "outside.png")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics[key] = {**(metrics[key] or {}), "file": file}
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(RunFolderError, match="which is not a file of the run folder"):
        load_run(run)


@pytest.mark.parametrize("extra, message", [
    (["--cell", "200000"], "--cell 200000: the side of a cell is from 16 to 2,048 pixels"),
    (["--out", "/proc/mosaic.png"], "error: cannot write --out /proc/mosaic.png"),
])
def test_figure_flags_that_cannot_work_are_one_error_line(finished_run, tmp_path, capsys, extra, message):
    from ldm.cli.figures import main as make_figure
    args = [str(finished_run), "--out", str(tmp_path / "mosaic.png"), *extra]
    assert make_figure(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "mosaic.png").exists()


@pytest.mark.parametrize("flag, make, message", [
    ("--featinv_decoder", "folder", "--featinv_decoder '{p}': a folder, not a file"),
    ("--gradient_decoder", "folder", "--gradient_decoder '{p}': a folder, not a file"),
    ("--prompt", "fifo", "target '{p}': not a regular file"),
    ("--prompt", "image(folder)", "image('{p}'): a folder, not a file"),
])
def test_a_folder_or_fifo_for_a_file_is_named_so(tiny_decoder, tmp_path, capsys, flag, make, message):
    path = tmp_path / ("x.png" if make == "fifo" else "x")
    os.mkfifo(path) if make == "fifo" else path.mkdir()
    value = f'image("{path}")' if make == "image(folder)" else str(path)
    args = tiny_args(tiny_decoder, tmp_path / "out", "--optim_timesteps", "1")
    args = ([*args, flag, value] if flag != "--prompt" else
            args[:args.index("--prompt") + 1] + [value] + args[args.index("--prompt") + 2:])
    if flag == "--featinv_decoder":
        args += ["--decoder", "featinv"]
    code, _, err = run_cli(TinyExtractor, args, capsys)
    assert code == 2 and message.format(p=path) in err, err


def test_a_legacy_checkpoint_of_pickle_protocol_4_is_named_so(tmp_path):
    from ldm.checkpoint import load_state_dict
    torch.save({"a": torch.ones(2)}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False,
               pickle_protocol=4)
    with pytest.raises(CheckpointError, match="legacy .* written with pickle protocol 4"):
        load_state_dict(tmp_path / "old.ckpt")
