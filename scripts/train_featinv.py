#!/usr/bin/env python
"""Train a FeatInv decoder (a ControlNet on a frozen LDM) for a vision model's feature.

    python scripts/train_featinv.py --extractor toy:all@body.17 --spatial --data toy \
        --base configs/toy/ldm.yaml --ckpt models/toy/ldm.safetensors --out outputs/featinv_toy

See ldm/featinv/train_command.py for the flags and the outputs (`--help`).
"""
import sys

from ldm.featinv.train_command import main

if __name__ == "__main__":
    sys.exit(main())
