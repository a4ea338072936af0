"""Download the wheels that the GPU machine's own Python lacks into .device_wheels/
(ldm/benchmarks/device_wheels.py; docs/gpu-check.md).

    python scripts/prepare_device_wheels.py
"""
import sys

from ldm.benchmarks.device_wheels import main

if __name__ == "__main__":
    sys.exit(main())
