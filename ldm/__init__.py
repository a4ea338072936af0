"""Decode what a vision model's feature encodes back into images.

    from ldm import decode, paper_settings
    results = decode(["cat.jpg"], "torchvision:resnet50", settings=paper_settings())

The public API, imported on first use (so that `import ldm.scorelog` stays light):
`decode`, `FeatureDecoder`, `paper_settings` (ldm/api.py), `build_extractor`
(ldm/extractors), `sample_feature_guided` (ldm/models/diffusion/feature_guidance.py).
"""
import importlib

_EXPORTS = {"decode": "ldm.api", "FeatureDecoder": "ldm.api", "paper_settings": "ldm.api",
            "build_extractor": "ldm.extractors",
            "sample_feature_guided": "ldm.models.diffusion.feature_guidance"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
