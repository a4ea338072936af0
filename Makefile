# Quick start: `make demo` and `make test`. Both create .venv/ with the pinned dependencies
# (constraints.txt) when it is missing (or when setup.py or constraints.txt changed), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast gpu-check device-wheels clean

$(STAMP): setup.py pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing the pinned dependencies into $(VENV)/ (about 6 GB with PyPI's CUDA build of torch; a few minutes)"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar on -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/toy_demo.py

# Two worker processes (pytest-xdist), one torch thread each: the suite in about half the time.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# The quick loop while editing: every test not marked `slow` (docs/testing.md), stopping at the first failure.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -x -m "not slow" tests

# On a machine with a GPU: correctness on CUDA, then speed at 512 (at most 8 minutes); writes
# outputs/gpu_check/gpu_check.md and .json, and runs the tests marked `gpu`.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py --out outputs/gpu_check
	$(PY) -m pytest -q -m gpu tests

# Here, for a GPU machine without network whose own python3 has torch but not omegaconf and
# open_clip: their wheels into .device_wheels/; there, `sh scripts/gpu_check_system_python.sh`.
device-wheels:
	$(PYTHON) scripts/prepare_device_wheels.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
