"""Download, here, the wheels of the packages the GPU machine's own Python lacks, so that the GPU
check runs there with that interpreter (docs/gpu-check.md).

That machine has no network and Python 3.12 with torch, torchvision, Lightning, timm,
transformers, safetensors, einops, PyYAML, regex, tqdm and huggingface-hub, but no omegaconf
and no open_clip. Those two and the dependencies the machine lacks (ftfy and its wcwidth), at
this project's pins (constraints.txt), are downloaded for CPython 3.12 on x86-64 Linux (all
pure Python but wcwidth, an abi3 wheel), 2.6 MB, into the ignored folder `.device_wheels/`
that the device tool carries.

    python scripts/prepare_device_wheels.py            # → .device_wheels/*.whl (make device-wheels)
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What the GPU machine lacks: omegaconf, open_clip_torch and its dependencies ftfy and wcwidth.
PACKAGES = ("omegaconf", "open_clip_torch", "ftfy", "wcwidth")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pins() -> dict[str, str]:
    """{name: version} of constraints.txt's `name==version` lines."""
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M))


def requirements() -> list[str]:
    found = pins()
    return [f"{name}=={found[name]}" for name in PACKAGES]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=str(REPO / ".device_wheels"),
                        help="folder for the wheels (default .device_wheels/, ignored by git)")
    out = Path(parser.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
               *platforms, "-d", str(out), *requirements()]
    if subprocess.run(command).returncode:
        print("error: pip could not download the wheels (is PyPI reachable?)", file=sys.stderr)
        return 2
    wheels = sorted(out.glob("*.whl"))
    print(f"{len(wheels)} wheels in {out} ({sum(w.stat().st_size for w in wheels) / 1e6:.1f} MB): "
          + ", ".join(w.name for w in wheels))
    return 0
