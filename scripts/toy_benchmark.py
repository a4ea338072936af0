"""The toy benchmark: decoded images keep exactly the attributes the feature encodes.

The benchmark lives in ldm/benchmarks/toy.py; `python scripts/toy_benchmark.py --help` lists its options.
"""
import sys

from ldm.benchmarks.toy import main

if __name__ == "__main__":
    sys.exit(main())
