"""The decoder kinds: how a target feature becomes images. Each kind is one class behind the
`DecoderKind` interface (ldm/decoders/base.py), listed once in `DECODER_KINDS` under its
`--decoder` name; the command line, the API, the benchmarks and the GPU check reach a kind only
through this registry.

    decoding = make_decoding(DecoderOptions("featinv", file="decoder.safetensors"))
    decoding.check("toy:all")                        # before anything loads
    model = decoding.load_model(config, ckpt, device)
    decoding.bind(extractor, device)
    result = sample_batch(decoding, model, objective, shape, seeds, settings=settings, hints=hints)

Adding a kind is one module with its class and one line below (docs/architecture.md). The
classes are imported when first used, so that parsing a command line and `--help` need no torch.
"""
from __future__ import annotations

import importlib

from ldm.decoders.base import DecoderOptions

# The registry: --decoder name → "module:Class".
DECODER_KINDS = {
    "guided": "ldm.decoders.guided:Guided",
    "featinv": "ldm.decoders.trained:FeatInv",
    "hybrid": "ldm.decoders.trained:Hybrid",
}


def decoder_kind(name: str):
    """The class of the kind `name` (ValueError listing the kinds for another name)."""
    if name not in DECODER_KINDS:
        raise ValueError(f"decoder must be one of {', '.join(DECODER_KINDS)}, not {name!r}")
    module, _, cls = DECODER_KINDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_decoding(options: DecoderOptions):
    """The kind `options.kind`, checked to have what it needs (ValueError naming the option)."""
    kind = decoder_kind(options.kind)
    if kind.needs_file and not options.file:
        raise ValueError(f"decoder {options.kind!r} needs featinv_decoder, a trained decoder file "
                         "(train one with scripts/train_featinv.py)")
    return kind(options)


def __getattr__(name: str):
    """The interface and the sampler setup, imported on first use (they need torch)."""
    lazy = {"DecoderKind": "ldm.decoders.base", "Sampling": "ldm.decoders.base",
            "sample_batch": "ldm.decoders.sampling", "target_generators": "ldm.decoders.sampling",
            "to_unit_range": "ldm.decoders.sampling"}
    if name not in lazy:
        raise AttributeError(f"module 'ldm.decoders' has no attribute {name!r}")
    return getattr(importlib.import_module(lazy[name]), name)


__all__ = ["DECODER_KINDS", "DecoderKind", "DecoderOptions", "Sampling", "decoder_kind",
           "make_decoding", "sample_batch", "target_generators", "to_unit_range"]
