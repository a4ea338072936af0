"""Decode a toy-world extractor's feature into images: the embedded default, which runs
anywhere in under a minute with the small models that ship in models/toy/.

The same flags and outputs as the Stable Diffusion scripts (--layer and --spatial included),
plus --extractor {toy_shape, toy_colour, toy_all}; the defaults (ldm/toy/defaults.py) point at
the toy model and a shipped sample target:

    python scripts/toy_guided.py --extractor toy_shape --optim_forward_guidance \
        --prompt data/toy/toy_00_red_circle.png --optim_folder outputs/toy_shape

The trained decoders ship too (--decoder featinv or hybrid; docs/trained-decoder.md):

    python scripts/toy_guided.py --extractor toy_all --decoder hybrid --optim_folder outputs/toy_hybrid
"""
import sys

from ldm.cli import main
from ldm.toy.defaults import TOY_CKPT_HINT, TOY_DEFAULTS, TOY_FEATINV_DECODERS, TOY_PRESETS
from ldm.toy.names import TOY_NETS

if __name__ == "__main__":
    sys.exit(main({name: name for name in TOY_NETS},
                  defaults=TOY_DEFAULTS, presets=TOY_PRESETS, ckpt_hint=TOY_CKPT_HINT,
                  featinv_decoders=TOY_FEATINV_DECODERS))
