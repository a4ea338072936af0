"""Every bad input gets a clear, early error (exit code 2, `error: ...`, no traceback), raised
before any model is built wherever the input can be checked without one; odd but valid images
(grey, palette, RGBA, 16-bit, EXIF-rotated, ...) work. The README's table of bad inputs lists
the same cases."""
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import ldm.models.loading as loading
from ldm.extractors.base import FeatureExtractor, to_rgb
from ldm.extractors.clip import ClipRN50Extractor
from ldm.guided_run import load_target_image, main
from tiny_models import TinyExtractor, tiny_config, write_tiny_sd

REPO = Path(__file__).resolve().parents[1]
T = 20
TARGET = REPO / "data/examples/chelsea.jpg"


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd"), T)


def args_for(sd_files, folder, *extra) -> list[str]:
    return ["--config", str(sd_files / "tiny.yaml"), "--ckpt", str(sd_files / "tiny.ckpt"),
            "--H", "16", "--W", "16", "--device", "cpu", "--no_progress", "--prompt", str(TARGET),
            "--optim_folder", str(folder), "--optim_forward_guidance", "--optim_timesteps", "2",
            *map(str, extra)]


def cli(extractor, args, capsys, **kw):
    code = main(extractor, argv=list(map(str, args)), **kw)
    out, err = capsys.readouterr()
    return code, out, err


def refuse_models(monkeypatch):
    """Fail the test if a model is built (the diffusion model or the target model)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the error")
    monkeypatch.setattr(loading, "build_model", refuse)   # load_model reads the file first
    monkeypatch.setattr(TinyExtractor, "__init__", refuse)


def files(tmp_path, sd_files):
    """Bad files for the table below."""
    made = {}
    made["half_ckpt"] = tmp_path / "half.ckpt"
    data = (sd_files / "tiny.ckpt").read_bytes()
    made["half_ckpt"].write_bytes(data[: len(data) // 2])
    made["garbage_safetensors"] = tmp_path / "garbage.safetensors"
    made["garbage_safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(64))
    made["half_png"] = tmp_path / "half.png"
    png = (REPO / "data/examples/chelsea.jpg").read_bytes()
    made["half_png"].write_bytes(png[: len(png) // 3])
    made["a_file"] = tmp_path / "a_file"
    made["a_file"].write_text("not a folder")
    return made


# (flags, message): no model may be built before these errors.
EARLY = [
    # checkpoint
    (["--ckpt", "{tmp}/nowhere.ckpt"], "Stable Diffusion v1.4 weights were not found at {tmp}/nowhere.ckpt"),
    (["--ckpt", "{half_ckpt}"], "the file is truncated or corrupt, re-download it"),
    (["--ckpt", "{garbage_safetensors}"], "invalid safetensors file"),
    (["--config", "{tmp}/nowhere.yaml"], "model config not found"),
    (["--extractor_weights", "{tmp}/nowhere.pth"], "--extractor_weights '{tmp}/nowhere.pth': no such file"),
    # target
    (["--prompt", "{tmp}/missing.png"], "looks like an image path, but no such file exists"),
    (["--prompt", "{tmp}"], "half.png' is not a readable image"),   # a folder: its images
    (["--prompt", REPO / "README.md"], "is not a readable image"),
    (["--prompt", "{half_png}"], "is not a readable image"),
    (["--prompt", "a photo of a dog"], "is not an image file, and tiny supports image targets only"),
    # sizes and schedule
    (["--H", "17"], "--H 17 must be a positive multiple of 2"),
    (["--W", "0"], "--W 0 must be a positive multiple of 2"),
    (["--optim_num_steps", "0"], "--optim_num_steps needs positive integers, got [0]"),
    (["--optim_num_steps", "8", "-1"], "--optim_num_steps needs positive integers, got [8, -1]"),
    (["--optim_early_emp_end", "1001"], "--optim_early_emp_end 1001 must be in [-1, 1000]"),
    (["--optim_early_emp_end", "-2"], "--optim_early_emp_end -2 must be in [-1, 1000]"),
    (["--optim_timesteps", "0"], "--optim_timesteps must be at least 1"),
    (["--optim_sim_queue_size", "0"], "--optim_sim_queue_size must be at least 1"),
    (["--save_every", "0"], "--save_every 0 must be at least 1"),
    # output folder
    (["--optim_folder", "{a_file}/out"], "cannot write to --optim_folder"),
    (["--optim_folder", "{a_file}"], "cannot write to --optim_folder"),
    # device
    (["--device", "cuda:7"], "--device 'cuda:7' is not available here"),
    (["--device", "nonsense"], "--device 'nonsense' is not available here"),
]


@pytest.mark.parametrize("flags, message", EARLY, ids=[" ".join(map(str, f)).replace(str(REPO), "")
                                                       for f, _ in EARLY])
def test_bad_input_fails_early_with_a_clear_error(sd_files, tmp_path, capsys, monkeypatch, flags, message):
    made = {k: str(v) for k, v in files(tmp_path, sd_files).items()}
    fill = lambda s: str(s).format(tmp=tmp_path, **made)  # noqa: E731
    folder = tmp_path / "out"
    refuse_models(monkeypatch)
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, folder), *map(fill, flags)], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and fill(message) in err, err
    assert "Traceback" not in err
    assert not folder.exists()     # nothing was created either


def test_empty_num_steps_is_an_argparse_error(sd_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(TinyExtractor, argv=[*args_for(sd_files, tmp_path / "out"), "--optim_num_steps"])
    assert exit_.value.code == 2
    assert "argument --optim_num_steps: expected at least one argument" in capsys.readouterr().err


@pytest.mark.skipif(getattr(__import__("os"), "geteuid", lambda: 1)() == 0,
                    reason="root can write into read-only folders")
def test_read_only_output_folder(sd_files, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    try:
        code, _, err = cli(TinyExtractor, args_for(sd_files, folder), capsys)
    finally:
        folder.chmod(0o700)
    assert code == 2 and "cannot write to --optim_folder" in err


def test_checkpoint_of_another_architecture_names_the_keys(sd_files, tmp_path, capsys):
    # Same layout, other widths: every mismatched key is named with both shapes.
    config = tiny_config(T)
    config.model.params.unet_config.params.model_channels = 64
    torch.manual_seed(0)
    state_dict = loading.build_model(config).state_dict()
    torch.save({"state_dict": state_dict}, tmp_path / "narrow.ckpt")
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, tmp_path / "a"), "--ckpt", tmp_path / "narrow.ckpt"], capsys)
    assert code == 2 and "does not look like a checkpoint for this model" in err
    assert "shape mismatches" in err and "model.diffusion_model.input_blocks.0.0.weight: file (64, 4, 3, 3) vs model (32, 4, 3, 3)" in err

    # Another model altogether (a classifier's weights).
    save_file(TinyExtractor().state_dict(), str(tmp_path / "classifier.safetensors"))
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, tmp_path / "b"),
                                       "--ckpt", tmp_path / "classifier.safetensors"], capsys)
    assert code == 2 and "missing from the file" in err and "unexpected in the file" in err
    assert "model.diffusion_model.time_embed.0.weight" in err and "net.0.weight (8, 3, 3, 3)" in err
    assert "Traceback" not in err


# --- images that work -------------------------------------------------------------------------

def _png_16bit_rgb(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda tag, data: (struct.pack(">I", len(data)) + tag + data  # noqa: E731
                               + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def odd_images(tmp_path: Path) -> dict[str, tuple[Path, Image.Image]]:
    """name → (file, the 8-bit upright RGB image it should read as)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    rgb[:, :8] = [255, 0, 0]                   # not symmetric: rotations are visible
    base = Image.fromarray(rgb)
    grey = base.convert("L")
    out = {}

    def add(name, image, expected, **save):
        path = tmp_path / name
        image.save(path, **save)
        out[name] = (path, expected)

    add("grey.png", grey, grey.convert("RGB"))
    palette = base.quantize(16)
    add("palette.png", palette, palette.convert("RGB"))
    rgba = base.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (24, 40), dtype=np.uint8)))
    add("rgba.png", rgba, base)                 # alpha dropped, as .convert("RGB") does
    add("grey_alpha.png", grey.convert("LA"), grey.convert("RGB"))
    add("grey16.png", Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), grey.convert("RGB"))
    _png_16bit_rgb(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 257)
    out["rgb16.png"] = (tmp_path / "rgb16.png", base)
    add("cmyk.jpg", base.convert("CMYK"), None, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6                            # "rotate 90° clockwise to display"
    add("rotated.jpg", base, None, exif=exif, quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        out["cmyk.jpg"] = (tmp_path / "cmyk.jpg", im.convert("RGB"))
    with Image.open(tmp_path / "rotated.jpg") as im:
        out["rotated.jpg"] = (tmp_path / "rotated.jpg", im.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    return out


MODES = {"grey.png": "L", "palette.png": "P", "rgba.png": "RGBA", "grey_alpha.png": "LA",
         "grey16.png": "I;16", "rgb16.png": "RGB", "cmyk.jpg": "CMYK", "rotated.jpg": "RGB"}


def test_odd_images_read_as_upright_8bit_rgb(tmp_path):
    for name, (path, expected) in odd_images(tmp_path).items():
        image = load_target_image(str(path))
        assert image.mode == MODES[name], name
        rgb = to_rgb(image)
        assert rgb.mode == "RGB" and rgb.size == expected.size, name
        assert np.array_equal(np.asarray(rgb), np.asarray(expected)), name
    # 16-bit grey is scaled to 8 bits, not clipped to white as a bare .convert("RGB") does.
    grey16 = load_target_image(str(tmp_path / "grey16.png"))
    assert np.asarray(grey16.convert("RGB")).mean() > 250 > np.asarray(to_rgb(grey16)).mean()
    # The extractors' target transform goes through the same conversion.
    extractor = TinyExtractor()
    grey16_x = extractor.preprocess_image(grey16)
    assert torch.equal(grey16_x, extractor.preprocess_image(Image.open(tmp_path / "grey.png")))


@pytest.mark.parametrize("name", list(MODES))
def test_odd_images_work_end_to_end(sd_files, tmp_path, capsys, name):
    path, _ = odd_images(tmp_path)[name]
    code, _, err = cli(TinyExtractor, [*args_for(sd_files, tmp_path / "out"), "--prompt", path], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["finished"] is True and metrics["target"]["kind"] == "image" and metrics["target"]["source"] == str(path)


# --- long text prompts ------------------------------------------------------------------------

class _TinyClipModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.token_embedding = nn.Embedding(49408, 8)

    def encode_image(self, x, normalize=False):
        return self.visual(x)

    def encode_text(self, tokens, normalize=False):
        return self.token_embedding(tokens).mean(1)


class TinyClip(ClipRN50Extractor):
    """The CLIP extractor's text path (open_clip's RN50 tokenizer, 77 tokens) on a tiny model."""

    name = "tiny_clip"
    input_size = 16

    def __init__(self, weights=None, device="cpu"):
        FeatureExtractor.__init__(self)
        import open_clip
        torch.manual_seed(0)
        self.model = _TinyClipModel()
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        self.freeze().to(device)


def test_long_prompt_is_truncated_with_a_warning_on_the_terminal(sd_files, tmp_path, capsys):
    long_prompt = " ".join(["a red car parked next to a small blue house"] * 10)   # 100+ tokens
    code, _, err = cli(TinyClip, [*args_for(sd_files, tmp_path / "long"), "--prompt", long_prompt],
                       capsys, text_only=True)
    assert code == 0, err
    assert "warning: text prompt of " in err and "longer than CLIP's limit of 77" in err
    assert "truncated to 77 tokens" in err
    code, _, err = cli(TinyClip, [*args_for(sd_files, tmp_path / "short"), "--prompt", "a red car"],
                       capsys, text_only=True)
    assert code == 0 and "warning" not in err


def test_early_emp_end_bounds_are_accepted():
    """[-1, 1000] is accepted: -1 is the reference's default (the first K everywhere)."""
    from ldm.guided_run import build_parser, validate_flags

    for value in ("-1", "0", "995", "1000"):
        validate_flags(build_parser("x").parse_args(["--optim_early_emp_end", value]))
