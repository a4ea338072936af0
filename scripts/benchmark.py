"""Speed of one guided iteration: seconds, memory, FLOPs, achieved TFLOP/s, projected run time.

The benchmark lives in ldm/benchmarks/speed.py; `python scripts/benchmark.py --help` lists its options.
"""
import sys

from ldm.benchmarks.speed import main

if __name__ == "__main__":
    sys.exit(main())
