"""Shared fixtures: absolute paths of the shipped model configs (tests may run from any cwd)."""
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sd_v1_config_path() -> Path:
    """The Stable Diffusion v1 inference config."""
    return REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    """Same classes and key layout as SD v1, small widths (fast on CPU)."""
    return REPO_ROOT / "configs" / "tiny" / "sd-v1-tiny.yaml"


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """Every cache directory points into tmp_path; the Hugging Face Hub is off."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared 2-core CPU, OpenMP threads competing for the
    cores make convolutions ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine: make gpu-check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def registry_as_it_was():
    """Classes a test registers (a script's own extractor class registers itself when its
    command line runs) are forgotten after it, as they would be at the end of a process."""
    from ldm.extractors import registry

    registry.load_plugins()
    aliases, classes = dict(registry.ALIASES), dict(registry.LOCAL_CLASSES)
    yield
    registry.ALIASES.clear()
    registry.ALIASES.update(aliases)
    registry.LOCAL_CLASSES.clear()
    registry.LOCAL_CLASSES.update(classes)
