"""`make demo`: decode one shipped toy target with each of the three toy extractors, write a
mosaic (target | final | best per extractor) and print the cosines and the oracle's readings
(ldm/cli/toy_demo.py). A stopped demo continues with `python scripts/toy_demo.py --resume`.
"""
import sys

from ldm.cli.toy_demo import main

if __name__ == "__main__":
    sys.exit(main())
