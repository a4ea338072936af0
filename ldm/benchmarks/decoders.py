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
from ldm.models.diffusion.feature_guidance import GuidanceSettings, sample_feature_guided
from ldm.objectives import FeatureDistance
from ldm.paths import shipped
from ldm.toy.defaults import TOY_DEFAULTS

TOY_TINY_DECODER = shipped("models/toy/taesd_decoder.safetensors")


def toy_guidance(**changes) -> GuidanceSettings:
    """The toy defaults (ldm/toy/defaults.py) with forward guidance on, as the command line
    resolves them, with `changes`."""
    options = RunOptions(**{**TOY_DEFAULTS, "optim_forward_guidance": True})
    return replace(options.settings(), **changes)


def saved_range(result) -> torch.Tensor:
    """A sampler result's final images in [0, 1]."""
    return ((result.final_images + 1) / 2).clamp(0, 1)


def seeded(goals: torch.Tensor, seed: int, device) -> list[torch.Generator]:
    """Target b of a batch with seed s draws from its own generator (s · 1000 + b)."""
    return [torch.Generator(device).manual_seed(seed * 1000 + b) for b in range(len(goals))]


def guided(tiny_decoder: bool = False, settings: GuidanceSettings | None = None, **changes):
    """The guided sampler at `settings` (default: the toy defaults with `changes`), and the
    shipped tiny decoder carrying the gradient, if asked."""
    def factory(model, extractor, costs):
        run_settings = settings or toy_guidance(**changes)
        tiny = None
        if tiny_decoder:
            from ldm.models.taesd import TinyFirstStage, load_taesd_decoder
            tiny = TinyFirstStage(load_taesd_decoder(TOY_TINY_DECODER))

        def decode(goals, targets, seed):
            objective = CountingObjective(FeatureDistance(extractor, goals), costs)
            shape = (len(goals), model.channels, model.image_size, model.image_size)
            result = sample_feature_guided(model, None, objective, run_settings, shape,
                                           seeded(goals, seed, goals.device), progress=False,
                                           gradient_decoder=tiny)
            return saved_range(result)
        return decode
    return factory


def _toy_featinv(extractor, costs, spatial: bool):
    """The shipped toy FeatInv decoder of `extractor`, counting its UNet evaluations, and a
    function of target images → hints."""
    from ldm.featinv import feature_to_hint, load_decoder
    from ldm.featinv.toy import decoder_name
    from ldm.toy.defaults import TOY_CKPT, TOY_CONFIG

    path = shipped(f"models/toy/{decoder_name(extractor.name, spatial)}.safetensors")
    model, record = load_decoder(path, shipped(TOY_CKPT), base_config=shipped(TOY_CONFIG))
    hint_extractor = record.build_extractor()

    def hints(targets):
        with torch.no_grad():
            return feature_to_hint(hint_extractor(targets * 2 - 1))
    return CountingModel(model, costs), hints


def featinv(spatial: bool = True, steps: int = 50, guidance_scale: float = 5.0):
    """FeatInv's DDIM sampler on the shipped toy decoder (ldm/featinv/toy.py)."""
    from ldm.models.diffusion.trained_decoding import FeatInvDenoiser, sample_featinv

    def factory(model, extractor, costs):
        control, hints = _toy_featinv(extractor, costs, spatial)

        def decode(goals, targets, seed):
            denoiser = FeatInvDenoiser(control, hints(targets), guidance_scale)
            objective = CountingObjective(FeatureDistance(extractor, goals), costs)
            shape = (len(goals), control.channels, control.image_size, control.image_size)
            result = sample_featinv(denoiser, objective, shape, seeded(goals, seed, goals.device),
                                    steps=steps, progress=False)
            return saved_range(result)
        return decode
    return factory


def hybrid(guidance_scale: float = 5.0, settings: GuidanceSettings | None = None, **changes):
    """The guided sampler at `settings` (default: the toy defaults with `changes`), its
    denoiser the spatial toy FeatInv decoder (guided over the hint with `guidance_scale`)."""
    from ldm.models.diffusion.trained_decoding import FeatInvDenoiser

    def factory(model, extractor, costs):
        control, hints = _toy_featinv(extractor, costs, True)
        run_settings = settings or toy_guidance(**changes)

        def decode(goals, targets, seed):
            denoiser = FeatInvDenoiser(control, hints(targets), guidance_scale)
            objective = CountingObjective(FeatureDistance(extractor, goals), costs)
            shape = (len(goals), control.channels, control.image_size, control.image_size)
            result = sample_feature_guided(denoiser, None, objective, run_settings, shape,
                                           seeded(goals, seed, goals.device), progress=False)
            return saved_range(result)
        return decode
    return factory


def toy_preset(name: str):
    """The toy script's preset `name` (scripts/toy_guided.py: its defaults, the preset, the toy's
    changes to it) as a decoder of this comparison: what `--preset fast` / `--decoder hybrid` run."""
    from ldm.cli.options import preset_options
    from ldm.toy.defaults import TOY_PRESETS

    options = preset_options(name, TOY_PRESETS, TOY_DEFAULTS)
    if options.decoder == "hybrid":
        return hybrid(guidance_scale=options.featinv_guidance, settings=options.settings())
    return guided(tiny_decoder=options.gradient_decoder is not None, settings=options.settings())


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
# `--decoders NAME ...` runs any of them.
VARIANTS = {
    "guided N 50, K 4,1": guided(timesteps=50, num_steps=(4, 1)),
    "guided N 50, K 4,1, skip + tiny": guided(tiny_decoder=True, timesteps=50, num_steps=(4, 1),
                                              skip_guided_decode=True),
    "guided N 50, K 4,1, skip + tiny + z0": guided(tiny_decoder=True, timesteps=50, num_steps=(4, 1),
                                                   skip_guided_decode=True, gradient="z0"),
    "guided N 25, K 4,1, skip": guided(skip_guided_decode=True, timesteps=25, num_steps=(4, 1)),
    "guided N 35, K 1, skip": guided(skip_guided_decode=True, timesteps=35, num_steps=(1,)),
    "guided N 30, K 4,1, skip + z0": guided(skip_guided_decode=True, gradient="z0", timesteps=30,
                                            num_steps=(4, 1)),
    "guided N 30, K 4,1, skip + tiny": guided(tiny_decoder=True, skip_guided_decode=True, timesteps=30,
                                              num_steps=(4, 1)),
    "guided N 60, K 4,1, skip + tiny + z0": guided(tiny_decoder=True, skip_guided_decode=True, gradient="z0",
                                                   timesteps=60, num_steps=(4, 1)),
    "guided N 40, K 4,1, skip + tiny": guided(tiny_decoder=True, skip_guided_decode=True, timesteps=40,
                                              num_steps=(4, 1)),
    **{f"hybrid N {n}, K {','.join(map(str, k))}, s {s:g}" + (f", w {w:g}" if w != 1 else ""):
       hybrid(guidance_scale=s, timesteps=n, num_steps=k, forward_guidance_wt=w)
       for n, k, s, w in [(25, (2, 1), 5, 1), (25, (2, 1), 1, 1), (25, (2, 1), 5, 4), (50, (1,), 1, 1),
                          (50, (1,), 2, 1), (50, (1,), 3, 1), (50, (1,), 5, 1), (50, (1,), 5, 2),
                          (50, (4, 1), 2, 1), (50, (4, 1), 5, 1), (60, (1,), 5, 1), (30, (2,), 5, 1),
                          (50, (4, 1), 3, 1), (60, (1,), 3, 1), (32, (2,), 3, 1)]},
}
