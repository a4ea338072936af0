"""The fast path's options (docs/fast-path.md), each on a tiny model: it changes what it should and
nothing else; off, the results are the reference path's (the golden test pins those bit for bit).
And the presets that combine them."""
import pytest
import torch

from ldm.cli.options import FAST, PAPER, TAESD_SD_DECODER, build_parser, parse_options
from ldm.models.diffusion.feature_guidance import GuidanceSettings, sample_feature_guided
from ldm.objectives import FeatureDistance
from ldm.scorelog import Score
from tiny_models import TinyExtractor, run_cli, tiny_args, tiny_model, write_tiny_sd

T = 20
SHAPE = (2, 4, 8, 8)
GUIDED = dict(forward_guidance=True, forward_guidance_wt=4.0, grad_clip_threshold=3.0, num_steps=(2, 1),
              early_emp_end=T - 2)


@pytest.fixture(scope="module")
def model():
    return tiny_model(T)


@pytest.fixture(scope="module")
def objective():
    extractor = TinyExtractor()
    target = extractor(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1).detach() * 3
    return FeatureDistance(extractor, target)


def run(model, objective, gradient_decoder=None, **changes):
    records = []
    gens = [torch.Generator().manual_seed(b) for b in range(SHAPE[0])]
    with torch.no_grad():
        cond = model.get_learned_conditioning([""])
    result = sample_feature_guided(model, cond, objective, GuidanceSettings(**{**GUIDED, **changes}), SHAPE,
                                   gens, on_record=records.append, progress=False,
                                   gradient_decoder=gradient_decoder)
    return result, [r for r in records if isinstance(r, Score)]


def test_skipping_the_guided_decode_changes_only_what_is_scored(model, objective):
    plain, plain_scores = run(model, objective)
    skipped, skipped_scores = run(model, objective, skip_guided_decode=True)
    # The trajectory does not read the guided estimate's score: the final images are the same.
    assert torch.equal(plain.final_images, skipped.final_images)
    assert torch.equal(plain.final_distance, skipped.final_distance)
    guided = [s for s in skipped_scores if s.stage == "guided"]
    assert len(guided) == SHAPE[0]                                     # the last iteration only
    assert [s for s in plain_scores if s.stage == "estimate"] == [s for s in skipped_scores if s.stage == "estimate"]
    assert plain.iterations == skipped.iterations


def test_the_z0_gradient_skips_the_unet_backward_pass(model, objective):
    calls = {"backward": 0}
    hook = model.model.register_full_backward_hook(lambda *a: calls.__setitem__("backward", calls["backward"] + 1))
    try:
        unet, _ = run(model, objective)
        through_unet = calls["backward"]
        z0, _ = run(model, objective, gradient="z0")
    finally:
        hook.remove()
    assert through_unet > 0 and calls["backward"] == through_unet      # no more UNet backward passes
    assert not torch.equal(unet.final_images, z0.final_images)         # another gradient, another path
    assert torch.isfinite(z0.final_images).all()


def test_a_gradient_decoder_that_is_the_full_one_changes_nothing(model, objective):
    plain, plain_scores = run(model, objective)
    same, same_scores = run(model, objective, gradient_decoder=model.decode_first_stage)
    assert torch.equal(plain.final_images, same.final_images)
    assert [s.distance for s in plain_scores] == [s.distance for s in same_scores]
    for a, b in zip(plain.best, same.best):      # best images rendered again by the full decoder
        assert (a.timestep, a.recurrence, a.stage) == (b.timestep, b.recurrence, b.stage)
        torch.testing.assert_close(a.image, b.image)   # alone, not in the batch: rounding only


def test_a_cheap_gradient_decoder_steers_but_the_full_one_renders(model, objective):
    from ldm.models.taesd import TinyDecoder, TinyDecoderConfig, TinyFirstStage

    torch.manual_seed(0)
    tiny = TinyFirstStage(TinyDecoder(TinyDecoderConfig(width=8, upsamples=1))).requires_grad_(False)
    plain, _ = run(model, objective)
    cheap, _ = run(model, objective, gradient_decoder=tiny)
    assert not torch.equal(plain.final_images, cheap.final_images)
    # The kept images are the full decoder's: a best estimate scored on the tiny decoder's image
    # keeps its latent and is rendered as D(latent), not tiny(latent).
    with torch.no_grad():
        for best in cheap.best:
            if best.latent is not None:
                torch.testing.assert_close(best.image, model.decode_first_stage(best.latent[None])[0])
                assert not torch.allclose(best.image, tiny(best.latent[None])[0], atol=1e-3)


def test_the_stride_guides_every_nth_timestep_below_its_boundary(model, objective):
    settings = GuidanceSettings(**{**GUIDED, "timesteps": 10, "guidance_stride": 3, "stride_below": 12})
    timesteps = settings.schedule(T)
    guided = [i for k, i in enumerate(timesteps) if settings.guided_at(timesteps, k)]
    # Every timestep from 12 up is guided; below, every third counted from the last (timestep 0).
    assert guided == [i for i in timesteps if i >= 12] + [i for k, i in enumerate(timesteps)
                                                         if i < 12 and (len(timesteps) - 1 - k) % 3 == 0]
    assert timesteps[-1] in guided
    assert settings.total_iterations(T) == sum(settings.recurrences(timesteps, k) for k in range(len(timesteps)))
    calls = {"n": 0}

    def counting(images):
        calls["n"] += 1
        return objective(images)
    result, scores = run(model, counting, timesteps=10, guidance_stride=3, stride_below=12, skip_guided_decode=True)
    expected = sum(settings.recurrences(timesteps, k) for k in range(len(timesteps))
                   if settings.guided_at(timesteps, k))
    assert calls["n"] == expected + 1            # one extractor call per guided iteration, + the last score
    assert result.iterations == settings.total_iterations(T)
    assert torch.isfinite(result.final_images).all()


def test_the_stride_off_is_the_respaced_sampler(model, objective):
    plain, _ = run(model, objective, timesteps=10)
    one, _ = run(model, objective, timesteps=10, guidance_stride=1, stride_below=5)
    assert torch.equal(plain.final_images, one.final_images)


def test_the_ddim_step_is_deterministic_and_draws_no_step_noise(model, objective):
    ancestral, _ = run(model, objective, timesteps=10)
    ddim, _ = run(model, objective, timesteps=10, step="ddim")
    again, _ = run(model, objective, timesteps=10, step="ddim")
    assert not torch.equal(ancestral.final_images, ddim.final_images)
    assert torch.equal(ddim.final_images, again.final_images)
    # One step by hand: z_prev = √ᾱ_prev ẑ0 + √(1 − ᾱ_prev) ε(z, ẑ0).
    from ldm.models.diffusion.schedule import ddim_step
    z, z0 = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.full((SHAPE[0],), 15, dtype=torch.long)
    abar = model.alphas_cumprod[10]
    expected = abar.sqrt() * z0 + (1 - abar).sqrt() * model.predict_noise_from_start(z, t, z0)
    torch.testing.assert_close(ddim_step(model, z, t, z0, 10), expected)


@pytest.mark.parametrize("changes, field", [({"step": "euler"}, "step"), ({"guidance_stride": 0}, "guidance_stride"),
                                            ({"stride_below": -2}, "stride_below")])
def test_bad_fast_path_settings_name_their_field(changes, field):
    from ldm.errors import SettingError
    with pytest.raises(SettingError) as err:
        GuidanceSettings(**{**GUIDED, **changes})
    assert err.value.parameter == field


def test_fast_preset_settings():
    options = parse_options(build_parser("x"), ["--preset", "fast"])
    assert {k: getattr(options, k) for k in FAST} == FAST
    assert options.gradient_decoder == TAESD_SD_DECODER
    settings = options.settings()
    timesteps = settings.schedule(1000)
    guided = sum(settings.recurrences(timesteps, k) for k in range(len(timesteps)) if settings.guided_at(timesteps, k))
    # 38 timesteps: 5 at >= 900 with K = 4, then K = 1, below 500 every third guided (the last one).
    assert settings.skip_guided_decode and settings.gradient == "z0"
    assert (settings.total_iterations(1000), guided) == (50, 38)
    assert parse_options(build_parser("x"), ["--preset", "fast", "--gradient_decoder", "none"]).gradient_decoder is None
    assert parse_options(build_parser("x"), ["--paper"]).skip_guided_decode is False
    # The paper's guidance (w, clipping); only the schedule and the cost options differ.
    assert all(FAST[k] == v for k, v in PAPER.items() if k != "optim_print" and k not in
               ("optim_num_steps", "optim_early_emp_end"))


def test_fast_preset_without_the_taesd_file_says_where_to_get_it(tmp_path, capsys):
    (tmp_path / "sd").mkdir()
    sd = write_tiny_sd(tmp_path / "sd")
    code, _, err = run_cli(TinyExtractor, tiny_args(sd, tmp_path / "out", "--preset", "fast",
                                                    "--optim_timesteps", "5", "--optim_early_emp_end", "3"), capsys)
    if not __import__("pathlib").Path(TAESD_SD_DECODER).is_file():
        assert code == 2 and "madebyollin/taesd" in err and "--gradient_decoder none" in err
        assert not (tmp_path / "out").exists()
