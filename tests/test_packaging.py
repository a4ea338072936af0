"""Static checks of the install paths (no network, no Docker engine): setup.py's ranges, the
exact versions of constraints.txt, and the Dockerfile's base image, context and pins."""
import ast
import fnmatch
import re
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def setup_requirements() -> list[Requirement]:
    """install_requires and every extra of setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and node.targets[0].id == "INSTALL_REQUIRES":
            found += ast.literal_eval(node.value)
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            found += [r for extra in ast.literal_eval(node.value).values() for r in extra]
    return [Requirement(r) for r in found]


def pins() -> dict[str, Version]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pairs = [line.split("==") for line in lines if line and not line.startswith("#")]
    assert all(len(pair) == 2 for pair in pairs), "constraints.txt holds only name==version lines"
    return {canonicalize_name(name): Version(version) for name, version in pairs}


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def dockerignore() -> list[str]:
    return [line for line in (REPO / ".dockerignore").read_text().splitlines()
            if line and not line.startswith("#")]


def test_setup_py_gives_ranges_not_pins():
    requirements = setup_requirements()
    assert len(requirements) > 10
    assert [str(r) for r in requirements if "==" in str(r.specifier)] == []
    assert all(r.specifier for r in requirements), "every dependency has a lower bound"


def test_every_pin_is_inside_its_range():
    pinned = pins()
    for requirement in setup_requirements():
        version = pinned.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} has no pin in constraints.txt"
        assert requirement.specifier.contains(version), f"{requirement.name}=={version} is not {requirement}"


def test_every_install_path_uses_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\):(.*)$", makefile, re.M).group(1).split()
    assert "constraints.txt" in stamp and "-c constraints.txt" in makefile
    assert "- -c constraints.txt" in (REPO / "environment.yaml").read_text()
    assert '-c constraints.txt ".[test]"' in dockerfile()


def test_the_base_image_has_the_cuda_of_the_pinned_torch_wheel():
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-base-", dockerfile(), re.M)
    assert base, "the base is an nvidia/cuda image of the 'base' flavour (the wheels bring CUDA)"
    runtime = pins()["nvidia-cuda-runtime"]          # the CUDA runtime the torch wheel depends on
    assert (int(base[1]), int(base[2])) == runtime.release[:2]


def test_pip_keeps_no_cache_and_no_build_tools_stay():
    text = dockerfile()
    installs = re.findall(r"pip install [^&\n]*", text)
    assert installs and all("--no-cache-dir" in line for line in installs)
    assert "build-essential" not in text and "purge -y --auto-remove software-properties-common" in text


def test_the_context_leaves_local_state_out_and_keeps_what_is_copied():
    patterns = dockerignore()
    ignored = lambda path: any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in patterns)
    for local in (".venv/bin/python", "outputs/demo/mosaic.png", ".git/HEAD",
                  "models/ldm/stable-diffusion/sd-v1-4.ckpt", "ldm/__pycache__/api.cpython-311.pyc"):
        assert ignored(local), local
    shipped = ["models/toy/ldm.safetensors", "configs/stable-diffusion/v1-inference.yaml", "ldm/api.py"]
    for line in re.findall(r"^COPY (.+) \S+$", dockerfile(), re.M):
        shipped += [source for source in line.split() if source != "."]
    for path in shipped:
        assert (REPO / path).exists() and not ignored(path), path


def test_the_cuda_runtime_pin_is_the_installed_torch_wheel_s():
    if Version(torch.__version__).public != str(pins()["torch"]) or torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} here is not the pinned CUDA wheel")
    assert tuple(map(int, torch.version.cuda.split(".")[:2])) == pins()["nvidia-cuda-runtime"].release[:2]
