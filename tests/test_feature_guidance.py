"""The guided sampler on a tiny model: maths, schedule, guards, reproducibility."""
import math

import pytest
import torch

from ldm.extractors.base import FeatureDistance
from ldm.models.diffusion.feature_guidance import (GuidanceSettings, clip_to_std,
                                                   rescale_to_noise_norm, sample_feature_guided)
from tiny_models import TinyExtractor, tiny_model

T = 20
SHAPE = (1, 4, 8, 8)


@pytest.fixture(scope="module")
def model():
    return tiny_model(T)


@pytest.fixture(scope="module")
def cond(model):
    with torch.no_grad():
        return model.get_learned_conditioning([""])


@pytest.fixture(scope="module")
def objective():
    extractor = TinyExtractor()
    target = extractor(torch.rand(1, 3, 16, 16) * 2 - 1).detach() * 3
    return FeatureDistance(extractor, target)


def run(model, cond, objective, seed=0, shape=SHAPE, **kw):
    settings = GuidanceSettings(**kw)
    gens = [torch.Generator().manual_seed(seed + b) for b in range(shape[0])]
    lines = []
    result = sample_feature_guided(model, cond, objective, settings, shape, gens,
                                   log=lambda b, line: lines.append((b, line)), progress=False)
    return result, lines


def test_unguided_k1_is_plain_ancestral_ddpm(model, cond, objective):
    result, _ = run(model, cond, objective, seed=3)
    # Independent DDPM ancestral sampling with variance beta_t, same noise stream.
    g = torch.Generator().manual_seed(3)
    z = torch.randn(SHAPE[1:], generator=g)[None]
    with torch.no_grad():
        for i in reversed(range(T)):
            t = torch.tensor([i])
            beta, abar = model.betas[i], model.alphas_cumprod[i]
            eps = model.apply_model(z, t, cond)
            if i == 0:
                z = (z - (1 - abar).sqrt() * eps) / abar.sqrt()
                break
            mean = (z - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt()
            z = mean + beta.sqrt() * torch.randn(SHAPE[1:], generator=g)[None]
        expected = model.decode_first_stage(z)
    torch.testing.assert_close(result.final_images, expected, atol=1e-4, rtol=1e-4)
    assert result.iterations == T


class CountingModel(torch.nn.Module):
    """Counts UNet evaluations of a wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.calls = 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def apply_model(self, *args):
        self.calls += 1
        return self.inner.apply_model(*args)


@pytest.mark.parametrize("num_steps, early_end, expected", [
    ((1,), -1, T),
    ((3,), -1, 3 * T),
    ((3, 1), T - 2, 2 * 3 + (T - 2) * 1),
    ((4, 9, 2), T - 5, 5 * 4 + (T - 5) * 2),   # middle values are ignored, as in the reference
    ((3, 1), T, T),                            # boundary beyond the first timestep: late K only
    ((2, 5), 0, 2 * T),                        # every timestep is early
])
def test_k_schedule_counts(model, cond, objective, num_steps, early_end, expected):
    counting = CountingModel(model)
    settings = GuidanceSettings(num_steps=num_steps, early_emp_end=early_end)
    assert settings.total_iterations(T) == expected
    result, _ = run(counting, cond, objective, num_steps=num_steps, early_emp_end=early_end,
                    forward_guidance=True)
    assert result.iterations == expected
    assert counting.calls == expected


def test_rescale_matches_noise_norm_per_image():
    grad = torch.randn(3, 4, 8, 8) * torch.tensor([1e-3, 1.0, 50.0]).view(3, 1, 1, 1)
    eps = torch.randn(3, 4, 8, 8) * torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1, 1)
    scaled, bad = rescale_to_noise_norm(grad, eps)
    assert not bad.any()
    torch.testing.assert_close(scaled.flatten(1).norm(dim=1), eps.flatten(1).norm(dim=1))
    # Direction is kept.
    cos = torch.nn.functional.cosine_similarity(scaled.flatten(1), grad.flatten(1))
    torch.testing.assert_close(cos, torch.ones(3))


def test_rescale_guards_zero_and_non_finite_gradients():
    grad = torch.randn(3, 4, 8, 8)
    grad[0] = 0
    grad[1, 0, 0, 0] = math.nan
    scaled, bad = rescale_to_noise_norm(grad, torch.randn(3, 4, 8, 8))
    assert bad.tolist() == [True, True, False]
    assert torch.isfinite(scaled).all()
    assert (scaled[:2] == 0).all()


def test_clip_clamps_to_mean_plus_minus_thr_std():
    grad = torch.randn(2, 4, 8, 8)
    grad[0, 0, 0, 0] = 100.0
    grad[1, 0, 0, 0] = -100.0
    clipped = clip_to_std(grad, 2.0)
    for b in range(2):
        m, sd = grad[b].mean(), grad[b].std()   # unbiased, over all elements of the image
        assert clipped[b].max() <= m + 2 * sd + 1e-6 and clipped[b].min() >= m - 2 * sd - 1e-6
        inside = (grad[b] - m).abs() <= 2 * sd
        assert torch.equal(clipped[b][inside], grad[b][inside])
    assert clipped[0, 0, 0, 0] == pytest.approx(float(grad[0].mean() + 2 * grad[0].std()), rel=1e-5)
    assert torch.equal(clip_to_std(grad, -1.0), grad)


def test_guidance_lowers_the_feature_distance(model, cond, objective):
    unguided, _ = run(model, cond, objective, seed=1, num_steps=(2,))
    guided, _ = run(model, cond, objective, seed=1, num_steps=(2,), forward_guidance=True,
                    forward_guidance_wt=4.0, grad_clip_threshold=3.0)
    assert guided.final_distance.item() < 0.5 * unguided.final_distance.item()
    assert guided.best[0].distance <= guided.final_distance.item() + 1e-6


def test_same_seed_same_images_bitwise(model, cond, objective):
    kw = dict(num_steps=(2, 1), early_emp_end=T - 3, forward_guidance=True, forward_guidance_wt=4.0,
              grad_clip_threshold=3.0)
    a, _ = run(model, cond, objective, seed=7, **kw)
    b, _ = run(model, cond, objective, seed=7, **kw)
    c, _ = run(model, cond, objective, seed=8, **kw)
    assert torch.equal(a.final_images, b.final_images)
    assert torch.equal(a.best[0].image, b.best[0].image)
    assert not torch.equal(a.final_images, c.final_images)


def test_log_lines_and_best_tracking(model, cond, objective):
    result, lines = run(model, cond, objective, num_steps=(2, 1), early_emp_end=T - 1,
                        forward_guidance=True, forward_guidance_wt=4.0)
    text = [line for _, line in lines]
    assert text[0].startswith(f"{T - 1}th timestep, 0th self-recurrence -> xy_dists:")
    assert text[1].startswith("!!! Found a better image (-inf -> ")
    assert any(line.startswith(f"{T - 1}th timestep, 1.5th self-recurrence -> xy_dists:") for line in text)
    assert text[-1].startswith("-1th timestep (FINAL) -> xy_dists:")
    scored = [float(line.split("xy_dists:")[1]) for line in text[:-1] if "self-recurrence ->" in line]
    assert len(scored) == 2 * result.iterations            # before and after guidance
    assert result.best[0].distance == pytest.approx(min(scored))
    assert float(text[-1].split("xy_dists:")[1]) == pytest.approx(result.final_distance.item())
    assert result.best[0].filename().startswith(f"out_img_best_t_{result.best[0].t}_rec_")


def test_nan_gradient_is_guarded_and_logged(model, cond):
    extractor = TinyExtractor()

    def objective(images):
        dist, cos = FeatureDistance(extractor, torch.zeros(1, 8))(images)
        return dist * torch.tensor(math.nan), cos    # distance and gradient are NaN

    result, lines = run(model, cond, objective, forward_guidance=True)
    assert result.guard_events == T
    assert torch.isfinite(result.final_images).all()
    assert any("not finite; this step is taken without guidance" in line for _, line in lines)


def test_backward_guidance_and_select_prev_run(model, cond, objective):
    result, lines = run(model, cond, objective, num_steps=(2,), forward_guidance=True,
                        backward_guidance=True, avg_sim_to_start_backward=1e9, max_iters=2,
                        select_prev=True)
    text = [line for _, line in lines]
    assert any(", 1th backward iteration -> xy_dists:" in line for line in text)
    assert any("0.9th self-recurrence, 2th backward iteration" in line for line in text)
    assert any("self-recurrence (z_prev) -> xy_dists:" in line for line in text)
    assert torch.isfinite(result.final_images).all()


def test_backward_gate_stays_closed_without_forward_guidance(model, cond, objective):
    # The moving average starts at distance 100 and only forward guidance updates it.
    _, lines = run(model, cond, objective, backward_guidance=True, avg_sim_to_start_backward=0.1)
    assert not any("backward iteration" in line for _, line in lines)


def test_unguided_run_reports_final_and_best(model, cond, objective):
    result, _ = run(model, cond, objective)
    assert math.isfinite(result.final_distance.item())
    assert result.best[0].image is not None and result.best[0].t >= 0


def test_respaced_schedule():
    full = GuidanceSettings().schedule(1000)
    assert full == list(range(999, -1, -1))
    assert GuidanceSettings(timesteps=1000).schedule(1000) == full
    sched = GuidanceSettings(timesteps=250).schedule(1000)
    assert len(sched) == 250 and sched[0] == 999 and sched[-1] == 0
    assert all(a > b for a, b in zip(sched, sched[1:]))
    assert GuidanceSettings(timesteps=1).schedule(1000) == [999]
    # The early-emphasis boundary keeps its meaning (a timestep index, i >= E).
    s = GuidanceSettings(timesteps=250, num_steps=(10, 2), early_emp_end=995)
    assert s.total_iterations(1000) == 10 * sum(i >= 995 for i in sched) + 2 * sum(i < 995 for i in sched)


def test_respaced_unguided_is_ancestral_ddpm_on_the_subset(model, cond, objective):
    result, _ = run(model, cond, objective, seed=5, timesteps=6)
    steps = GuidanceSettings(timesteps=6).schedule(T)
    assert result.iterations == 6
    g = torch.Generator().manual_seed(5)
    z = torch.randn(SHAPE[1:], generator=g)[None]
    abar = model.alphas_cumprod.double()
    with torch.no_grad():
        for k, i in enumerate(steps):
            eps = model.apply_model(z, torch.tensor([i]), cond)
            if i == 0:
                z = model.predict_start_from_noise(z, torch.tensor([0]), eps)
                break
            beta = (1 - abar[i] / abar[steps[k + 1]]).float()
            mean = (z - beta / (1 - abar[i].float()).sqrt() * eps) / (1 - beta).sqrt()
            z = mean + beta.sqrt() * torch.randn(SHAPE[1:], generator=g)[None]
        expected = model.decode_first_stage(z)
    torch.testing.assert_close(result.final_images, expected, atol=1e-4, rtol=1e-4)
