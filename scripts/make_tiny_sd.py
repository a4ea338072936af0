"""Write a tiny random-weight stand-in for Stable Diffusion v1 (tiny.yaml, tiny.safetensors)
into OUT, to try every SD script without the 4 GB checkpoint (see ldm/models/tiny_sd.py).

    python scripts/make_tiny_sd.py outputs/tiny_sd [--timesteps 1000] [--seed 0]
"""
import sys

from ldm.models.tiny_sd import main

if __name__ == "__main__":
    sys.exit(main())
