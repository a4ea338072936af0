"""The decoders the toy comparison runs (ldm/benchmarks/compare.py): each is a factory
`(model, extractor, costs) → decode(goals, targets, seed) → images in [0, 1]` (goals: the
target features, targets: the target images in [0, 1], which a trained decoder's hint is read
from), counting into `costs` the extractor evaluations that take a gradient (the model passed
in counts its UNet evaluations; a trained decoder wraps its own ControlLDM the same way)."""
from __future__ import annotations

from dataclasses import replace

import torch

from ldm.benchmarks.compare import CountingModel, CountingObjective
from ldm.cli.options import RunOptions
from ldm.decoders import DecoderOptions, decoder_kind, make_decoding, sample_batch, to_unit_range
from ldm.models.diffusion.feature_guidance import GuidanceSettings
from ldm.objectives import FeatureDistance
from ldm.paths import shipped
from ldm.toy.defaults import TOY_CKPT, TOY_CONFIG, TOY_DEFAULTS

TOY_TINY_DECODER = shipped("models/toy/taesd_decoder.safetensors")


def toy_guidance(**changes) -> GuidanceSettings:
    """The toy defaults (ldm/toy/defaults.py) with forward guidance on, as the command line
    resolves them, with `changes`."""
    options = RunOptions(**{**TOY_DEFAULTS, "optim_forward_guidance": True})
    return replace(options.settings(), **changes)


def seeds(goals: torch.Tensor, seed: int) -> list[int]:
    """Target b of a batch with seed s draws from its own generator (s · 1000 + b)."""
    return [seed * 1000 + b for b in range(len(goals))]


def _decoder(options: DecoderOptions, settings: GuidanceSettings | None, tiny: bool = False):
    """A comparison decoder of the kind `options`, at `settings` (trained kinds: the shipped toy
    decoder file), its gradient through the shipped tiny decoder if `tiny`."""
    def factory(model, extractor, costs):
        decoding = make_decoding(options)
        if decoding.needs_file:
            model = decoding.load_model(shipped(TOY_CONFIG), shipped(TOY_CKPT), "cpu")
            decoding.bind(extractor, "cpu")
            model = CountingModel(model, costs)
        gradient_decoder = None
        if tiny:
            from ldm.models.taesd import TinyFirstStage, load_taesd_decoder
            gradient_decoder = TinyFirstStage(load_taesd_decoder(TOY_TINY_DECODER))

        def decode(goals, targets, seed):
            objective = CountingObjective(FeatureDistance(extractor, goals), costs)
            shape = (len(goals), model.channels, model.image_size, model.image_size)
            result = sample_batch(decoding, model, objective, shape, seeds(goals, seed), settings=settings,
                                  hints=decoding.image_hints(targets * 2 - 1, goals),
                                  gradient_decoder=gradient_decoder, progress=False)
            return to_unit_range(result.final_images)
        return decode
    return factory


def _toy_file(extractor_name: str, spatial: bool) -> str:
    from ldm.toy_build.featinv_decoders import decoder_name

    return str(shipped(f"models/toy/{decoder_name(extractor_name, spatial)}.safetensors"))


def guided(tiny_decoder: bool = False, settings: GuidanceSettings | None = None, **changes):
    """The guided sampler at `settings` (default: the toy defaults with `changes`), and the
    shipped tiny decoder carrying the gradient, if asked."""
    return _decoder(DecoderOptions(), settings or toy_guidance(**changes), tiny_decoder)


def _toy_kind(kind: str, guidance_scale: float, settings=None, *, spatial: bool = True, steps: int = 50,
              tiny: bool = False):
    """The decoder kind `kind`; a trained one with the shipped toy decoder of the run's extractor."""
    def factory(model, extractor, costs):
        file = _toy_file(extractor.name, spatial) if decoder_kind(kind).needs_file else None
        return _decoder(DecoderOptions(kind, file, steps, guidance_scale), settings, tiny)(model, extractor, costs)
    return factory


def featinv(spatial: bool = True, steps: int = 50, guidance_scale: float = 5.0):
    """FeatInv's DDIM sampler on the shipped toy decoder (ldm/toy_build/featinv_decoders.py)."""
    return _toy_kind("featinv", guidance_scale, spatial=spatial, steps=steps)


def hybrid(guidance_scale: float = 5.0, settings: GuidanceSettings | None = None, **changes):
    """The guided sampler at `settings` (default: the toy defaults with `changes`), its
    denoiser the spatial toy FeatInv decoder (guided over the hint with `guidance_scale`)."""
    return _toy_kind("hybrid", guidance_scale, settings or toy_guidance(**changes))


def toy_preset(name: str):
    """The toy script's preset `name` (scripts/toy_guided.py: its defaults, the preset, the toy's
    changes to it) as a decoder of this comparison: what `--preset fast` / `--decoder hybrid` run."""
    from ldm.cli.options import preset_options
    from ldm.toy.defaults import TOY_PRESETS

    options = preset_options(name, TOY_PRESETS, TOY_DEFAULTS)
    return _toy_kind(options.decoder, options.featinv_guidance, options.settings(),
                     tiny=options.gradient_decoder is not None)


# The comparison's rows (docs/trained-decoder.md, docs/fast-path.md): the guided decoder at the
# toy defaults, the fast path's options one at a time, the presets, the trained decoders.
DECODERS = {
    "guided": guided(),
    "guided, skip guided decode": guided(skip_guided_decode=True),
    "guided, z0 gradient": guided(gradient="z0"),
    "guided, tiny decoder": guided(tiny_decoder=True),
    "fast preset": toy_preset("fast"),
    "featinv spatial": featinv(spatial=True),
    "featinv pooled": featinv(spatial=False),
    "hybrid": toy_preset("hybrid"),
}
# The variants measured to choose the presets (docs/fast-path.md, docs/trained-decoder.md);
# `--decoders NAME ...` runs any of them. The fast path's front: the preset before this one, the
# DDIM step, and the stride schedule at about 1/30, 1/10 and 1/4 of the paper path's FLOPs.
FAST = dict(skip_guided_decode=True, gradient="z0")
VARIANTS = {
    "fast preset before (N 25, K 4,1, skip)": guided(skip_guided_decode=True, timesteps=25, num_steps=(4, 1)),
    "N 25, K 4,1, skip, DDIM": guided(skip_guided_decode=True, timesteps=25, num_steps=(4, 1), step="ddim"),
    "N 50, K 4,1, stride 2, z0, skip": guided(**FAST, timesteps=50, num_steps=(4, 1), guidance_stride=2),
    "N 40, K 4,1, stride 3 below 600, z0, skip": guided(**FAST, timesteps=40, num_steps=(4, 1), guidance_stride=3,
                                                       stride_below=600),
    "N 16, K 1, stride 2 below 500, z0, skip": guided(**FAST, timesteps=16, num_steps=(1,), guidance_stride=2,
                                                      stride_below=500),
    "N 20, K 1, stride 3 below 700, z0, skip": guided(**FAST, timesteps=20, num_steps=(1,), guidance_stride=3,
                                                      stride_below=700),
    "N 36, K 8,2, z0, skip": guided(**FAST, timesteps=36, num_steps=(8, 2)),
    "N 96, K 4,1, stride 3 below 500, z0, skip": guided(**FAST, timesteps=96, num_steps=(4, 1), guidance_stride=3,
                                                       stride_below=500),
    **{f"hybrid N {n}, K {','.join(map(str, k))}, s {s:g}" + (f", w {w:g}" if w != 1 else ""):
       hybrid(guidance_scale=s, timesteps=n, num_steps=k, forward_guidance_wt=w)
       for n, k, s, w in [(25, (2, 1), 5, 1), (25, (2, 1), 1, 1), (25, (2, 1), 5, 4), (50, (1,), 1, 1),
                          (50, (1,), 2, 1), (50, (1,), 3, 1), (50, (1,), 5, 1), (50, (1,), 5, 2),
                          (50, (4, 1), 2, 1), (50, (4, 1), 5, 1), (60, (1,), 5, 1), (30, (2,), 5, 1),
                          (50, (4, 1), 3, 1), (60, (1,), 3, 1), (32, (2,), 3, 1)]},
}
