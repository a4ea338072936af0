"""The GPU check (ldm/benchmarks/gpu_check.py): correctness on CUDA, speed at 512 for three
extractors, batch 1 and 4, fp32 and bf16, the paper's iteration and the fast preset's.

    python scripts/gpu_check.py                       # make gpu-check
    python scripts/gpu_check.py --device cpu --quick  # the CPU part (CI)
"""
import sys

from ldm.benchmarks.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
