"""The command line shared by every script (`scripts/*_guided.py`, `scripts/feature_guided.py`).

A script is its extractor (a registry name or a class) plus one call:
`sys.exit(main("torchvision:resnet50"))`. The flags (ldm/cli/options.py) are the reference's
`--optim_*` flags plus this tool's; the outputs are the reference's (`out_img.png`, the best
image, intermediates with `--optim_print`, `log.txt`) plus `metrics.json` and
`target_features.safetensors`, in run folders (ldm/run_folder).

Runs survive interruption: the resume state is written every `--save_every` iterations and on
SIGINT/SIGTERM, `--resume` continues bit for bit, a folder holding a run is never clobbered
without `--overwrite`, and a NaN/inf stops the run keeping the best image and the state.

Exit codes: 0 finished, 2 bad input (message, no traceback), 3 numerical fault, 130 / 143
stopped by SIGINT / SIGTERM (state saved).
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.cli.options import build_parser, parse_options

if TYPE_CHECKING:
    from ldm.extractors import FeatureExtractor

EXIT_BAD_INPUT = 2


def _title(extractor) -> str:
    if extractor is None:
        return "any registered"
    if isinstance(extractor, dict):
        return "/".join(extractor)
    return extractor if isinstance(extractor, str) else extractor.name


def main(extractor: str | type[FeatureExtractor] | dict | None = None, *, description: str | None = None,
         defaults: dict | None = None, presets: dict | None = None, text_only: bool = False,
         ckpt_hint: str | None = None, argv: list[str] | None = None,
         resume_hint: str | None = None, featinv_decoders: dict | None = None) -> int:
    """The whole command line of a script. `extractor`: a registry name
    ("torchvision:resnet50"), an extractor class, a dict name → either (adds an `--extractor`
    flag choosing among them, the first is the default), or None (adds a required
    `--extractor` taking any registry name). `defaults`: the script's own defaults; `presets`:
    the script's changes to a preset (e.g. {"paper": {"optim_grad_clip_threshold": 2.0}});
    `resume_hint`: the command that continues a stopped run (default: this one with --resume);
    `featinv_decoders`: the trained decoder file of each --extractor choice, the default of
    --featinv_decoder (the toy ships them).
    → the exit code (0 finished, 2 bad input, 3 numerical fault, 130/143 stopped by a signal)."""
    parser = build_parser(description or f"Decode a {_title(extractor)} feature into images with "
                          "feature-guided latent diffusion.", defaults,
                          extractor=extractor if isinstance(extractor, dict) else
                          ("any" if extractor is None else None))
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse_options(parser, argv, presets)
    # The model stack is imported once the flags are parsed: --help needs no torch.
    from ldm.checkpoint import CheckpointError
    from ldm.cli.batch import EXIT_NUMERICAL_FAULT, RunStopped
    from ldm.decoders import decoder_kind
    from ldm.cli.command import run
    from ldm.cli.signals import EXIT_SIGNAL
    from ldm.errors import InputError
    from ldm.files import DISK_FULL
    from ldm.models.loading import SD_V14_MISSING_HINT
    from ldm.run_folder import names
    chosen = (extractor[options.extractor] if isinstance(extractor, dict)
              else options.extractor if extractor is None else extractor)
    if not options.featinv_decoder and featinv_decoders and decoder_kind(options.decoder).needs_file:
        options.featinv_decoder = featinv_decoders.get(options.extractor)
    try:
        run(chosen, options, text_only=text_only, ckpt_hint=ckpt_hint or SD_V14_MISSING_HINT, argv=argv,
            resume_hint=resume_hint)
    except (InputError, FileNotFoundError, CheckpointError) as err:
        # Expected user-facing errors (bad flags or inputs, missing or broken weights): no traceback.
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        print(f"error: cannot write {err.filename or options.optim_folder} ({err.strerror}): free some "
              "space, then run it again (with --resume if a resume state was saved)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunStopped as stopped:
        print(("error: " if stopped.exit_code == EXIT_NUMERICAL_FAULT else "") + str(stopped),
              file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        state = Path(options.optim_folder) / names.STATE
        kept = (f"; the last periodic resume state is kept in {state} (continue with --resume)"
                if state.is_file() else "")
        print(f"\ninterrupted{kept}", file=sys.stderr)
        return EXIT_SIGNAL[signal.SIGINT]
    return 0
