"""Names the command line offers, in a module without torch, so that `--help` and
`python -m ldm flags` answer without loading the model stack."""

LOSSES = ("squared", "cosine")
PRECISION_NAMES = ("fp32", "bf16", "fp16")   # ldm/models/diffusion/mixed_precision.py's dtypes

# Short names from before the registry (ldm/extractors/registry.py) and the specs they stand for;
# tests/test_registry.py checks the toy ones against the toy extractor classes.
ALIASES = {"resnet50": "torchvision:resnet50", "vit_h_14": "torchvision:vit_h_14",
           "clip_rn50": "open_clip:RN50",
           **{f"toy_{name}": f"toy:{name}" for name in ("shape", "colour", "all")}}


def named_extractors() -> list[str]:
    """The short names and the named entries (paper and toy models): `python -m ldm list-extractors`."""
    return [*ALIASES, *ALIASES.values()]
