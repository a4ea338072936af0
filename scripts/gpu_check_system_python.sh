#!/bin/sh
# The GPU check with the GPU machine's own python3 (no .venv, no network there): the wheels that
# scripts/prepare_device_wheels.py put in .device_wheels/ go into a --target folder on
# PYTHONPATH, then scripts/gpu_check.py (with --budget_s 360, so that everything ends within
# 8 minutes) and the tests marked gpu. Results in $OUT/gpu_check (default outputs/gpu_check).
#
#     sh scripts/gpu_check_system_python.sh            # PYTHON=python3, SITE=/tmp/gpu_check_site
set -e
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/gpu_check_site}
"$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$SITE" .device_wheels/*.whl
export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1
"$PYTHON" scripts/gpu_check.py --out "${OUT:-outputs}/gpu_check" --budget_s 360 "$@"
"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_check.py
