"""Shared fixtures: absolute paths of the shipped model configs (tests may run from any cwd);
Ctrl-C that stops the test run even while a test runs the command line in this process."""
import os
import signal
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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@pytest.fixture(autouse=True)
def signals_reach_pytest(request, monkeypatch):
    """A test that runs the command line in this process hands SIGINT/SIGTERM to the command
    line (its handlers save and stop the run, its KeyboardInterrupt becomes exit code 130), so
    pytest would never see the Ctrl-C. Here every handler of those signals during the test, the
    ones of Python installed before it and those installed by it, notes each delivery; after the test the handlers of
    before are back and a noted signal is delivered again to them (SIGINT: KeyboardInterrupt,
    pytest stops with exit code 2). Tests that signal themselves on purpose are marked
    `signals_itself`."""
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    received = []
    install = signal.signal

    def noted(handler):
        def note(signum, frame):
            received.append(signum)
            if callable(handler):
                return handler(signum, frame)
        note.notes = True
        return note

    def noting(signum, handler):
        if signum in STOP_SIGNALS and callable(handler) and not getattr(handler, "notes", False):
            handler = noted(handler)
        return install(signum, handler)

    for signum, handler in before.items():
        if callable(handler):   # SIG_DFL (SIGTERM's) stays: it ends pytest at once
            install(signum, noted(handler))
    monkeypatch.setattr(signal, "signal", noting)
    yield
    for signum, handler in before.items():
        install(signum, handler)
    if received and not request.node.get_closest_marker("signals_itself"):
        signal.raise_signal(received[0])


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


def pytest_configure(config):
    """Under `pytest -n 2` (make test), each worker process runs torch on one thread: two
    workers of two threads each on the 2-core CPU would make convolutions many times slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine: make gpu-check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def registry_at_start():
    """The extractor registry as a process starts with it (its plugins loaded)."""
    from ldm.extractors import registry

    registry.load_plugins()
    return dict(registry.ALIASES), dict(registry.LOCAL_CLASSES)


@pytest.fixture(autouse=True)
def registry_as_it_was(registry_at_start):
    """Classes a test or a fixture registers (a script's own extractor class registers itself
    when its command line runs) are forgotten after each test, as at the end of a process."""
    from ldm.extractors import registry

    yield
    for live, start in zip((registry.ALIASES, registry.LOCAL_CLASSES), registry_at_start):
        live.clear()
        live.update(start)
