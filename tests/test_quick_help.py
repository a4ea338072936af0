"""`--help` and the listings answer without importing the model stack (torch, torchvision):
importing it took 35-48 s on a cold 2-core machine (issue 23)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

HEAVY = {"torch", "torchvision", "open_clip", "timm", "transformers", "pytorch_lightning"}


def imported_modules(*args: str) -> set[str]:
    """Every module `python -X importtime ARGS` imported (its import report on stderr)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {line.rpartition("|")[2].strip() for line in done.stderr.splitlines()
            if line.startswith("import time:")}


@pytest.mark.parametrize("args", [
    ("scripts/feature_guided.py", "--help"),
    ("scripts/resnet50_guided.py", "--help"),
    ("scripts/toy_guided.py", "--help"),
    ("scripts/make_figure.py", "--help"),
    ("-m", "ldm", "list-extractors"),
    ("-m", "ldm", "flags"),
])
def test_help_and_listings_import_no_model_stack(args):
    modules = imported_modules(*args)
    assert "ldm" in modules            # the report is read right
    assert not modules & HEAVY, f"{' '.join(args)} imported {sorted(modules & HEAVY)}"


def test_listing_of_named_extractors_is_the_registry_s():
    from ldm.extractors import build_extractor, list_extractors
    from ldm.toy.extractors import TOY_EXTRACTORS

    listed = subprocess.run([sys.executable, "-m", "ldm", "list-extractors"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120).stdout.split()
    assert listed == list_extractors()
    assert {name for name in listed if name.startswith("toy_")} == set(TOY_EXTRACTORS)
    assert build_extractor("toy_shape").name == "toy_shape"
