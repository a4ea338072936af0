"""Train and evaluate the toy world's small models (ldm/toy_build/build.py): into outputs/toy_models
by default, `--out models/toy` to rebuild the shipped files.

    python scripts/train_toy.py [--only STAGE ...] [--out DIR]
"""
import sys

from ldm.toy_build.build import main

if __name__ == "__main__":
    sys.exit(main())
