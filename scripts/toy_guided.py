"""Decode a toy-world extractor's feature into images: the embedded default, which runs
anywhere in about a minute with the small models that ship in models/toy/.

Same flags and outputs as the Stable Diffusion scripts, plus --extractor {toy_shape, toy_colour,
toy_all}; the defaults (ldm/toy/defaults.py) point at the toy model and a shipped sample target:

    python scripts/toy_guided.py --extractor toy_shape --optim_forward_guidance \
        --prompt data/toy/toy_00_red_circle.png --optim_folder outputs/toy_shape
"""
import sys

from ldm.extractors.toy import TOY_EXTRACTORS
from ldm.guided_run import main
from ldm.toy.defaults import TOY_CKPT_HINT, TOY_DEFAULTS

if __name__ == "__main__":
    sys.exit(main(TOY_EXTRACTORS, defaults=TOY_DEFAULTS, ckpt_hint=TOY_CKPT_HINT))
