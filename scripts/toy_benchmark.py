"""The toy benchmark: decoded images keep exactly the attributes the feature encodes.

The benchmark lives in ldm/benchmarks/toy.py; `python scripts/toy_benchmark.py --help` lists its options.
It runs on the toy scripts' one torch thread (TOY_DEFAULTS["threads"], docs/toy-world.md).
"""
import sys

from ldm.benchmarks.toy import main
from ldm.toy.defaults import TOY_DEFAULTS
from ldm.toy_build.nets_training import set_threads

if __name__ == "__main__":
    set_threads(TOY_DEFAULTS["threads"])
    sys.exit(main())
