"""Figures of finished guided-decoding runs, as PNG and PDF.

  mosaic (the default): paper-style mosaic, one row per target: the target, then for each model
      a final | best column pair under the model's name, each image captioned with the cosine
      similarity and the squared distance of its feature to the target feature.
  curves: the squared distance and the cosine similarity from each run's log.txt against the
      timestep, noisiest to cleanest, several runs overlaid.

RUN arguments are run folders (an --optim_folder) or folders holding them (a multi-target
--optim_folder, a study's tree): the run folders under them are found recursively, in sorted
order. The mosaic skips unfinished runs with a warning; the curves plot unfinished runs too.

--out decides the formats by its suffix: fig.png or fig.pdf writes that file, fig (no suffix)
writes both fig.png and fig.pdf.

    python scripts/make_figure.py outputs/toy_shape outputs/toy_colour --out outputs/mosaic
    python scripts/make_figure.py curves outputs/toy_shape outputs/toy_colour --out outputs/curves
"""
import sys

from ldm.cli.figures import main

if __name__ == "__main__":
    sys.exit(main())
