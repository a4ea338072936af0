"""The guided sampler on a tiny model: maths, schedule, guards, reproducibility."""
import math

import pytest
import torch

from ldm.errors import SettingError
from ldm.models.diffusion.feature_guidance import GuidanceSettings, sample_feature_guided
from ldm.models.diffusion.guidance import clip_to_std, rescale_to_noise_norm
from ldm.objectives import FeatureDistance
from ldm.run_folder import names
from ldm.scorelog import Guarded, Improved, Score
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
    """→ (result, every record the sampler reported)."""
    settings = GuidanceSettings(**kw)
    gens = [torch.Generator().manual_seed(seed + b) for b in range(shape[0])]
    records = []
    result = sample_feature_guided(model, cond, objective, settings, shape, gens,
                                   on_record=records.append, progress=False)
    return result, records


def scores(records, stage=None):
    return [r for r in records if isinstance(r, Score) and (stage is None or r.stage == stage)]


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


@pytest.mark.parametrize("num_steps", [(4, 9, 2), (), (0,), (2, -1)])
def test_k_takes_one_or_two_positive_values(num_steps):
    """The reference silently ignored middle values of --optim_num_steps; here they are refused."""
    with pytest.raises(SettingError, match="num_steps"):
        GuidanceSettings(num_steps=num_steps)


@pytest.mark.parametrize("field, value", [("lr", math.nan), ("lr", -1.0), ("lr", 0.0),
                                          ("forward_guidance_wt", math.inf), ("loss_cutoff", math.nan),
                                          ("avg_sim_to_start_backward", math.nan),
                                          ("sim_queue_size", 10 ** 10), ("max_iters", 0), ("timesteps", 0)])
def test_settings_refuse_values_that_cannot_work(field, value):
    with pytest.raises(SettingError) as err:
        GuidanceSettings(**{field: value})
    assert err.value.parameter == field


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


def test_records_and_best_tracking(model, cond, objective):
    result, records = run(model, cond, objective, num_steps=(2, 1), early_emp_end=T - 1,
                          forward_guidance=True, forward_guidance_wt=4.0)
    first, better = records[0], records[1]
    assert (first.timestep, first.recurrence, first.stage) == (T - 1, 0, "estimate")
    assert isinstance(better, Improved) and better.old == -math.inf and better.new == -first.distance
    assert any((r.timestep, r.recurrence, r.stage) == (T - 1, 1, "guided") for r in scores(records))
    final = records[-1]
    assert final.stage == "final" and final.distance == pytest.approx(result.final_distance.item())
    scored = [r.distance for r in scores(records) if r.stage != "final"]
    assert len(scored) == 2 * result.iterations            # before and after guidance
    assert result.best[0].distance == pytest.approx(min(scored))
    assert names.best_image(result.best[0]).startswith(f"out_img_best_t_{result.best[0].timestep}_rec_")


def test_zero_gradient_is_guarded_and_logged(model, cond):
    """A flat objective (all-zero gradient) is not a fault: each step runs without guidance."""
    def objective(images):
        flat = images.sum() * 0 + 1.0              # constant distance, zero gradient
        return flat.expand(images.shape[0]), torch.zeros(images.shape[0])

    result, records = run(model, cond, objective, forward_guidance=True)
    assert result.guard_events == [T]
    assert torch.isfinite(result.final_images).all()
    assert [(r.timestep, r.recurrence) for r in records if isinstance(r, Guarded)] == [
        (i, 0) for i in range(T - 1, -1, -1)]


def test_backward_guidance_and_select_prev_run(model, cond, objective):
    result, records = run(model, cond, objective, num_steps=(2,), forward_guidance=True,
                          backward_guidance=True, avg_sim_to_start_backward=1e9, max_iters=2,
                          select_prev=True)
    iterations = scores(records, "backward_iteration")
    assert {r.backward_iteration for r in iterations} == {0, 1}
    assert {r.backward_iteration for r in scores(records, "backward")} == {2}
    assert len(scores(records, "z_prev")) == 2 * (T - 1)   # every self-recurrence but the last timestep's
    assert any(isinstance(r, Improved) and r.what == "z_prev" for r in records)
    assert torch.isfinite(result.final_images).all()


def test_backward_gate_stays_closed_without_forward_guidance(model, cond, objective):
    # The moving average starts at distance 100 and only forward guidance updates it.
    _, records = run(model, cond, objective, backward_guidance=True, avg_sim_to_start_backward=0.1)
    assert not scores(records, "backward_iteration") and not scores(records, "backward")


def test_unguided_run_reports_final_and_best(model, cond, objective):
    result, _ = run(model, cond, objective)
    assert math.isfinite(result.final_distance.item())
    assert result.best[0].image is not None and result.best[0].timestep >= 0


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


# --- interruption, resumption, numerical faults ----------------------------------------------

def _stop_after(n: int):
    """should_stop() that says stop at the n-th iteration boundary (n = 0: before any work)."""
    polls = iter(range(10 ** 9))
    return lambda: next(polls) == n


RESUME_KW = dict(num_steps=(3, 1), early_emp_end=T - 3, forward_guidance=True, forward_guidance_wt=4.0,
                 grad_clip_threshold=3.0, select_prev=True, backward_guidance=True,
                 avg_sim_to_start_backward=1e9, max_iters=2, sim_queue_size=4)
RESUME_SHAPE = (2, 4, 8, 8)   # two targets, each with its own generator


@pytest.fixture(scope="module")
def resume_reference(model, cond, objective):
    """The uninterrupted run the resumed ones are compared with."""
    return run(model, cond, objective, seed=11, shape=RESUME_SHAPE, **RESUME_KW)


@pytest.mark.parametrize("stop_at", [0, 1, 2, 4, 8, 9, 25])   # 26 iterations: 3 x 3 + 17 x 1
def test_stop_save_load_resume_is_bitwise(model, cond, objective, resume_reference, tmp_path, stop_at):
    """Stopping at any iteration boundary (mid-timestep included), writing the state to disk
    and resuming from it gives exactly the uninterrupted run: images, best records, log."""
    from ldm.models.diffusion.feature_guidance import SamplingStopped
    from ldm.run_folder import load_state, save_state

    settings = GuidanceSettings(**RESUME_KW)
    full, full_records = resume_reference
    assert full.iterations == 26

    records = []
    gens = [torch.Generator().manual_seed(11 + b) for b in range(2)]
    with pytest.raises(SamplingStopped) as stopped:
        sample_feature_guided(model, cond, objective, settings, RESUME_SHAPE, gens,
                              on_record=records.append, progress=False,
                              should_stop=_stop_after(stop_at))
    assert stopped.value.state.iterations == stop_at
    save_state(tmp_path / "state.safetensors", stopped.value.state, {"note": "test"})
    state, run_meta = load_state(tmp_path / "state.safetensors")
    assert run_meta == {"note": "test"}

    other_gens = [torch.Generator().manual_seed(999) for _ in range(2)]   # states come from the file
    resumed = sample_feature_guided(model, cond, objective, settings, RESUME_SHAPE, other_gens,
                                    on_record=records.append, progress=False, state=state)
    assert torch.equal(resumed.final_images, full.final_images)
    assert torch.equal(resumed.final_distance, full.final_distance)
    assert resumed.iterations == full.iterations and resumed.guard_events == full.guard_events
    for a, b in zip(resumed.best, full.best):
        assert a.to_json() == b.to_json() and names.best_image(a) == names.best_image(b)
        assert torch.equal(a.image, b.image)
    assert records == full_records


def test_checkpoints_come_every_n_iterations_and_each_resumes(model, cond, objective):
    kw = dict(num_steps=(3, 1), early_emp_end=T - 3, forward_guidance=True, forward_guidance_wt=4.0)
    settings = GuidanceSettings(**kw)
    full, _ = run(model, cond, objective, seed=4, **kw)
    states = []
    sample_feature_guided(model, cond, objective, settings, SHAPE, [torch.Generator().manual_seed(4)],
                          progress=False, on_checkpoint=states.append, checkpoint_every=5)
    assert [s.iterations for s in states] == [5, 10, 15, 20, 25]
    assert (states[0].k, states[0].j) == (1, 2)      # mid-timestep: 3 + 2 iterations
    resumed = sample_feature_guided(model, cond, objective, settings, SHAPE, [torch.Generator()],
                                    progress=False, state=states[0])
    assert torch.equal(resumed.final_images, full.final_images)


def test_a_state_of_another_schedule_is_refused(model, cond, objective):
    from ldm.models.diffusion.feature_guidance import SamplingStopped

    with pytest.raises(SamplingStopped) as stopped:
        run_settings = GuidanceSettings(num_steps=(3,))
        sample_feature_guided(model, cond, objective, run_settings, SHAPE, [torch.Generator()],
                              progress=False, should_stop=_stop_after(2))
    with pytest.raises(ValueError, match="self-recurrence 2 of timestep 19, which has only 1"):
        sample_feature_guided(model, cond, objective, GuidanceSettings(num_steps=(1,)), SHAPE,
                              [torch.Generator()], progress=False, state=stopped.value.state)


class FaultyModel(CountingModel):
    """Puts NaN (or inf) into one of the model's outputs from the `after`-th call on."""

    def __init__(self, model, method: str, after: int, value=math.nan):
        super().__init__(model)
        self.method, self.after, self.value, self.count = method, after, value, 0

    def _maybe_bad(self, out):
        self.count += 1
        return out * self.value if self.count > self.after else out

    def apply_model(self, *args):
        out = self.inner.apply_model(*args)
        return self._maybe_bad(out) if self.method == "apply_model" else out

    def predict_noise_from_start(self, *args):
        out = self.inner.predict_noise_from_start(*args)
        return self._maybe_bad(out) if self.method == "predict_noise_from_start" else out


@pytest.mark.parametrize("method, value, stage", [
    ("apply_model", math.inf, "noise prediction (UNet output)"),
    ("predict_noise_from_start", math.nan, "latent"),
])
def test_nan_or_inf_in_the_latent_stops_with_the_timestep(model, cond, objective, method, value, stage):
    from ldm.models.diffusion.feature_guidance import NumericalFault

    faulty = FaultyModel(model, method, after=7, value=value)   # the 8th call: timestep 19 - 7 = 12
    with pytest.raises(NumericalFault) as fault:
        run(faulty, cond, objective, forward_guidance=True, forward_guidance_wt=4.0)
    assert fault.value.stage == stage and fault.value.timestep == 12 and fault.value.recurrence == 0
    assert f"in the {stage} at timestep 12, self-recurrence 0" in str(fault.value)
    state = fault.value.state          # the start of the faulty iteration, with the best so far
    assert (state.timestep, state.j, state.iterations) == (12, 0, 7)
    assert state.best[0].image is not None and torch.isfinite(state.best[0].image).all()
    assert torch.isfinite(state.z).all()


def test_nan_in_the_features_stops_with_the_timestep(model, cond):
    from ldm.models.diffusion.feature_guidance import NumericalFault

    extractor, calls = TinyExtractor(), [0]

    def objective(images):
        calls[0] += 1
        dist, cos = FeatureDistance(extractor, torch.zeros(1, 8))(images)
        return (dist * math.nan if calls[0] == 9 else dist), cos   # 9th call: timestep 15, before guidance

    with pytest.raises(NumericalFault) as fault:
        run(model, cond, objective, forward_guidance=True, forward_guidance_wt=4.0)
    assert fault.value.stage.startswith("feature distance") and fault.value.timestep == 15
    best = fault.value.state.best[0]       # found before the fault, kept
    assert best.timestep >= 16 and best.image is not None and math.isfinite(best.score)


class _NaNGradientAtOneElement(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[0, 0, 0, 0] = math.nan
        return grad


class NaNGradientModel(CountingModel):
    """The UNet's input gets a NaN gradient in one element."""

    def apply_model(self, z, t, cond):
        if z.requires_grad:
            z = _NaNGradientAtOneElement.apply(z)
        return self.inner.apply_model(z, t, cond)


@pytest.mark.parametrize("where", ["one element", "every element"])
def test_non_finite_gradient_is_a_fault(model, cond, where):
    """A NaN in the guidance gradient stops the run even though the distance is finite, whether
    in one element or all of them; only an all-zero gradient is guarded
    (test_zero_gradient_is_guarded_and_logged)."""
    from ldm.models.diffusion.feature_guidance import NumericalFault

    extractor = TinyExtractor()

    def objective(images):
        dist, cos = FeatureDistance(extractor, torch.zeros(1, 8))(images)
        if where == "every element":   # 0 · sqrt(0): value 0, gradient 0 · inf = NaN everywhere
            dist = dist + 0 * (images[:, :1, :1, :1] * 0).sum().sqrt()
        return dist, cos

    net = NaNGradientModel(model) if where == "one element" else model
    with pytest.raises(NumericalFault) as fault:
        run(net, cond, objective, forward_guidance=True)
    assert fault.value.stage == "guidance gradient" and fault.value.timestep == T - 1
    assert "guidance gradient at timestep 19, self-recurrence 0" in str(fault.value)


def test_forward_guidance_syncs_only_to_log(model, cond, objective, monkeypatch):
    """Checks are resolved with the log lines' host transfer: two per guided iteration (the
    scores before and after guidance) and one at the end; no `.item()` anywhere."""
    from ldm.models.diffusion.device_checks import DeviceChecks

    transfers, flush = [], DeviceChecks.flush

    def counting(self, *values):
        if self.pending or values:
            transfers.append(len(values))
        return flush(self, *values)

    def no_item(self):
        raise AssertionError("Tensor.item() in the sampler's loop")

    monkeypatch.setattr(DeviceChecks, "flush", counting)
    monkeypatch.setattr(torch.Tensor, "item", no_item)
    result, _ = run(model, cond, objective, forward_guidance=True, num_steps=(2,))
    assert len(transfers) == 2 * result.iterations + 1
    assert transfers.count(2) == 2 * result.iterations   # distance and cosine of each score
