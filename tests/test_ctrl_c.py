"""Ctrl-C stops the test suite, also while a test runs the command line in this process (whose
SIGINT handler saves the run and returns 130): pytest ends as interrupted (exit code 2) instead
of counting one failed test and going on. The suite is a small test file run by a pytest
subprocess with this project's conftest.py."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from tiny_models import REPO, TESTS

INNER = """
import time
from pathlib import Path

from tiny_models import TinyExtractor, run_cli, tiny_args, write_tiny_sd

HERE = Path(__file__).parent


class SlowExtractor(TinyExtractor):
    def encode(self, x):
        (HERE / "running").touch()   # the test below may send its signal now
        time.sleep(0.2)
        return super().encode(x)


def test_runs_the_command_line_in_process(tmp_path, capsys):
    sd = write_tiny_sd(tmp_path)
    args = tiny_args(sd, tmp_path / "out", "--optim_forward_guidance", "--optim_num_steps", "50")
    run_cli(SlowExtractor, args, capsys)


def test_after():
    (HERE / "went_on").touch()
"""


@pytest.mark.slow
def test_sigint_during_an_in_process_run_stops_pytest(tmp_path):
    (tmp_path / "test_inner.py").write_text(INNER)
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    pytest_run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         "-c", os.devnull, str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "running").exists():
            assert pytest_run.poll() is None, pytest_run.communicate()[0]
            assert time.monotonic() < deadline, "the in-process run never started"
            time.sleep(0.1)
        pytest_run.send_signal(signal.SIGINT)
        out, _ = pytest_run.communicate(timeout=120)
    finally:
        pytest_run.kill()
    assert pytest_run.returncode == 2, out        # pytest's "interrupted"
    assert "KeyboardInterrupt" in out and not (tmp_path / "went_on").exists(), out
