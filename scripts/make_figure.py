"""Figures of finished decoding runs, as PNG and PDF: mosaics and score curves (ldm/cli/figures.py,
docs/figures.md).

    python scripts/make_figure.py outputs/toy_shape outputs/toy_colour --out outputs/mosaic
    python scripts/make_figure.py curves outputs/toy_shape outputs/toy_colour --out outputs/curves
"""
import sys

from ldm.cli.figures import main

if __name__ == "__main__":
    sys.exit(main())
