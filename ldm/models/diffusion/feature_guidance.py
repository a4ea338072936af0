"""Feature-guided DDPM sampling ("forward guidance" with self-recurrence), after Shirahama et al.,
"Feature Space Analysis by Guided Diffusion Model" (2025), itself derived from Bansal et al.,
"Universal Guidance for Diffusion Models" (2023).

The sampler takes any latent diffusion model (`apply_model`, `predict_start_from_noise`,
`predict_noise_from_start`, `decode_first_stage`, `betas`, `alphas_cumprod`, `num_timesteps`)
and any objective mapping decoded images in [-1, 1] to (loss [B], cosine [B]). It does no I/O:
scores go out as records (`ldm.scorelog`), intermediate images to a callback.

Per visited timestep i it runs K self-recurrences (ldm/models/diffusion/schedule.py). One
recurrence with forward guidance (steps in ldm/models/diffusion/guidance.py):

    ε = UNet(z_i);  ẑ0 = x0(z_i, ε);  s = −‖f(D(ẑ0)) − f_s‖²
    g = ∂s/∂z_i · ‖ε‖/‖∂s/∂z_i‖, clipped to mean ± thr·std        (per image)
    ε' = ε − w·g;  ẑ0' = x0(z_i, ε')
    z_{i−1} = ancestral DDPM step from (z_i, ẑ0') with variance β_i
    z_i ← √(1−β_i) z_{i−1} + √β_i n     (re-noise, unless it is the last recurrence)

Batches hold independent targets: every statistic (norms, clipping, best image, moving average)
is per image, and each image draws its noise from its own generator.

The loop advances one `SamplerState`. `on_checkpoint(state)` receives a snapshot every
`checkpoint_every` iterations; `should_stop()` is polled at each iteration boundary and makes
the sampler raise `SamplingStopped` carrying the state; `state=` starts from one (bit for bit
the uninterrupted run on the same device and thread count). A NaN or inf raises
`NumericalFault` (ldm/models/diffusion/device_checks.py); an all-zero guidance gradient is not
a fault: that step is taken without guidance and reported (`Guarded`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from ldm.choices import GRADIENTS, SAMPLER_STEPS
from ldm.errors import SettingError
from ldm.models.diffusion import guidance as steps
from ldm.models.diffusion.device_checks import DeviceChecks, NumericalFault  # noqa: F401 (API)
from ldm.models.diffusion.mixed_precision import MixedPrecision, autocast_dtype
from ldm.models.diffusion.sampler_state import BestImage, SamplerState
from ldm.models.diffusion.schedule import (ancestral_step, ddim_step, recurrences, renoise, step_beta,
                                           visited_timesteps)
from ldm.scorelog import Guarded, Improved, Record, Score

Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
RecordFn = Callable[[Record], None]
ImageFn = Callable[[int, str, int, int, torch.Tensor], None]   # (b, stage, i, j, image)
MAX_RECURRENCES = 1_000_000
MAX_QUEUE = 1_000_000


def _finite(name: str, value, low: float = -math.inf, strict_low: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SettingError(name, f"must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < low or (strict_low and value == low):
        bound = "" if low == -math.inf else f" {'>' if strict_low else '>='} {low:g}"
        raise SettingError(name, f"must be a finite number{bound}, got {value!r}")
    return value


def _count(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SettingError(name, f"must be an integer from {low} to {high:,}, got {value!r}")
    return value


@dataclass
class GuidanceSettings:
    """The sampler's settings; names follow the reference's `--optim_*` flags. Bad values raise
    `SettingError` naming the field."""

    forward_guidance: bool = False
    forward_guidance_wt: float = 5.0
    grad_clip_threshold: float = -1.0
    num_steps: tuple[int, ...] = (1,)
    early_emp_end: int = -1
    backward_guidance: bool = False
    lr: float = 1e-2
    max_iters: int = 1
    loss_cutoff: float = 1e-5
    avg_sim_to_start_backward: float = 0.1
    sim_queue_size: int = 80
    select_prev: bool = False
    save_intermediates: bool = False   # --optim_print
    print_every: int = 10              # intermediate images every `print_every` timesteps
    timesteps: int | None = None       # respaced schedule: this many of the model's timesteps
    # The fast path (docs/fast-path.md); the defaults are the reference's.
    gradient: str = "unet"             # "unet": ∂s/∂z_i through the UNet; "z0": ∂s/∂ẑ0 (no UNet Jacobian)
    skip_guided_decode: bool = False   # score the estimate only; decode ẑ0' where an image is written
    step: str = "ancestral"            # "ddim": the deterministic DDIM step (η = 0) from ẑ0'
    guidance_stride: int = 1           # guide every n-th visited timestep below `stride_below`; the others: one UNet step
    stride_below: int | None = None    # the timestep below which the stride applies (None: everywhere)

    def __post_init__(self):
        for name in ("forward_guidance_wt", "grad_clip_threshold", "avg_sim_to_start_backward"):
            setattr(self, name, _finite(name, getattr(self, name)))
        self.lr = _finite("lr", self.lr, 0.0, strict_low=True)
        self.loss_cutoff = _finite("loss_cutoff", self.loss_cutoff, 0.0)
        steps_ = tuple(self.num_steps)
        if not 1 <= len(steps_) <= 2:
            raise SettingError("num_steps", f"takes one or two values (K for the early timesteps, "
                               f"then K for the rest), got {list(steps_)}")
        self.num_steps = tuple(_count("num_steps", k, 1, MAX_RECURRENCES) for k in steps_)
        self.early_emp_end = _count("early_emp_end", self.early_emp_end, -1, 10 ** 9)
        self.max_iters = _count("max_iters", self.max_iters, 1, 100_000)
        self.sim_queue_size = _count("sim_queue_size", self.sim_queue_size, 1, MAX_QUEUE)
        self.print_every = _count("print_every", self.print_every, 1, 10 ** 9)
        if self.timesteps is not None:
            self.timesteps = _count("timesteps", self.timesteps, 1, 10 ** 9)
        if self.gradient not in GRADIENTS:
            raise SettingError("gradient", f"{self.gradient!r} is not one of {', '.join(GRADIENTS)}")
        if self.step not in SAMPLER_STEPS:
            raise SettingError("step", f"{self.step!r} is not one of {', '.join(SAMPLER_STEPS)}")
        self.guidance_stride = _count("guidance_stride", self.guidance_stride, 1, 10 ** 9)
        if self.stride_below is not None:
            self.stride_below = _count("stride_below", self.stride_below, 0, 10 ** 9)

    def check_for(self, num_timesteps: int) -> None:
        """SettingError unless the schedule fits a model of `num_timesteps` timesteps."""
        if self.timesteps is not None and self.timesteps > num_timesteps:
            raise SettingError("timesteps", f"{self.timesteps} is more than the model's "
                               f"{num_timesteps} timesteps")
        if self.early_emp_end > num_timesteps:
            raise SettingError("early_emp_end", f"{self.early_emp_end} is past the model's last "
                               f"timestep index {num_timesteps - 1} (-1 means everywhere)")

    def _strided_out(self, timesteps: list[int], k: int) -> bool:
        """Whether the stride leaves the k-th visited timestep unguided: below `stride_below` it
        keeps every `guidance_stride`-th, counted from the last (which is always kept)."""
        below = self.stride_below is None or timesteps[k] < self.stride_below
        return below and (len(timesteps) - 1 - k) % self.guidance_stride != 0

    def guided_at(self, timesteps: list[int], k: int) -> bool:
        return self.forward_guidance and not self._strided_out(timesteps, k)

    def recurrences(self, timesteps: list[int], k: int) -> int:
        """K at the k-th visited timestep; 1 where the stride leaves it unguided."""
        if self._strided_out(timesteps, k):
            return 1
        return recurrences(timesteps[k], self.num_steps, self.early_emp_end)

    def schedule(self, num_timesteps: int) -> list[int]:
        return visited_timesteps(num_timesteps, self.timesteps)

    def total_iterations(self, num_timesteps: int) -> int:
        timesteps = self.schedule(num_timesteps)
        return sum(self.recurrences(timesteps, k) for k in range(len(timesteps)))


@dataclass
class GuidedResult:
    final_images: torch.Tensor          # [B, 3, H, W] in about [-1, 1]: D(ẑ0') of the last iteration
    final_distance: torch.Tensor        # [B]
    final_cosine: torch.Tensor          # [B]
    best: list[BestImage]
    iterations: int
    guard_events: list[int]             # per target: steps whose guidance gradient was zero


class SamplingStopped(Exception):
    """`should_stop()` returned True: the loop stopped at an iteration boundary; `state` is
    where to resume from."""

    def __init__(self, state: SamplerState):
        super().__init__(f"sampling stopped before timestep {state.timestep}, self-recurrence "
                         f"{state.j} ({state.iterations} iterations done)")
        self.state = state


class Scorer:
    """Scores decoded images with the objective, reports the records and keeps the best image
    per target (the reference's `check_image`)."""

    def __init__(self, objective: Objective, best: list[BestImage], emit: RecordFn, checks: DeviceChecks):
        self.objective, self.best, self.emit, self.checks = objective, best, emit, checks
        self.where = (0, 0)    # (timestep, self-recurrence) being scored
        self.last = None       # (images, distance, cosine) of the latest evaluation
        self.last_host = None  # (distances, cosines) of the latest evaluation, as lists

    def __call__(self, images, stage: str, bk: int | None = None, grad: bool = False, latents=None):
        """Evaluate, report and track; → (dist, cos). This is the evaluation's one host sync:
        the pending checks and a non-finite distance raise before anything is reported.
        `latents`: kept with a best image, to be rendered by the full decoder at the end."""
        with torch.set_grad_enabled(grad):
            dist, cos = self.objective(images)
        backward = stage in ("backward_iteration", "backward")
        self.checks.check(dist.detach(), "feature distance (target model features)"
                          + (", backward guidance" if backward else ""))
        dist_host, cos_host = (x.tolist() for x in self.checks.flush(dist, cos))
        t, j = self.where
        for b, (d, c) in enumerate(zip(dist_host, cos_host)):
            score = Score(b, t, j, stage, d, c, bk)
            self.emit(score)
            if -d > self.best[b].score:
                self.emit(Improved(b, self.best[b].score, -d))
                self.best[b] = BestImage.of(score, images[b], None if latents is None else latents[b])
        self.last, self.last_host = (images.detach(), dist.detach(), cos.detach()), (dist_host, cos_host)
        return dist, cos


@dataclass
class _Run:
    """What one sampling call works with (everything but the loop state)."""

    model: object
    cond: torch.Tensor | None
    objective: Objective
    settings: GuidanceSettings
    generators: list[torch.Generator]
    checks: DeviceChecks
    score: Scorer
    emit: RecordFn
    save: ImageFn
    precision: str
    gradient_decoder: Callable | None = None   # a cheap decoder carrying the gradient (or None)

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(like.shape[1:], generator=g, device=like.device)
                            for g in self.generators])

    def save_all(self, stage: str, i: int, j: int, images: torch.Tensor) -> None:
        self.checks.flush()  # no image is saved from a faulty iteration
        for b in range(images.shape[0]):
            self.save(b, stage, i, j, images[b])


def _fresh_state(run: _Run, shape, device) -> SamplerState:
    batch = shape[0]
    z = torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in run.generators])
    return SamplerState(k=0, j=0, timestep=-1, iterations=0, history_count=0, z=z,
                        history=torch.full((batch, run.settings.sim_queue_size), -100.0, device=device),
                        best_prev_score=steps.no_candidate(batch, device),
                        do_backward=torch.zeros(batch, dtype=torch.bool, device=device),
                        best_prev_z=None, best=[BestImage() for _ in range(batch)],
                        guard_events=[0] * batch, generator_states=[])


def _resumed_state(state: SamplerState, run: _Run, timesteps, shape, device) -> SamplerState:
    check_state(state, run.settings, timesteps, shape)
    for g, g_state in zip(run.generators, state.generator_states):
        g.set_state(g_state.clone())
    return state.on(device)


def check_state(state: SamplerState, s: GuidanceSettings, timesteps: list[int], shape) -> None:
    """ValueError for a state that cannot belong to this schedule, settings and shape."""
    if not 0 <= state.k < len(timesteps) or timesteps[state.k] != state.timestep:
        raise ValueError(f"resume state at schedule position {state.k} (timestep {state.timestep}) "
                         f"does not fit this schedule of {len(timesteps)} timesteps")
    if not 0 <= state.j < s.recurrences(timesteps, state.k):
        raise ValueError(f"resume state at self-recurrence {state.j} of timestep {state.timestep}, "
                         f"which has only {s.recurrences(timesteps, state.k)}")
    done = sum(s.recurrences(timesteps, k) for k in range(state.k)) + state.j
    if state.iterations != done:
        raise ValueError(f"resume state says {state.iterations} iterations are done, but its "
                         f"position (timestep {state.timestep}, self-recurrence {state.j}) means {done}")
    if tuple(state.z.shape) != tuple(shape) or set(state.list_lengths().values()) != {shape[0]}:
        raise ValueError(f"resume state for latents {tuple(state.z.shape)}, not {tuple(shape)}")
    if tuple(state.history.shape) != (shape[0], s.sim_queue_size):
        raise ValueError("resume state does not fit these settings (moving-average size or batch)")


def sample_feature_guided(
    model, cond: torch.Tensor | None, objective: Objective, settings: GuidanceSettings,
    shape: tuple[int, int, int, int], generators: list[torch.Generator], *,
    on_record: RecordFn | None = None, on_intermediate: ImageFn | None = None,
    progress: bool = True, state: SamplerState | None = None,
    on_checkpoint: Callable[[SamplerState], None] | None = None, checkpoint_every: int = 0,
    should_stop: Callable[[], bool] | None = None, precision: str = "fp32",
    gradient_decoder: Callable | None = None,
) -> GuidedResult:
    """Run the guided reverse process for a batch of `shape[0]` independent targets.

    `objective(images)` → (loss [B], cosine [B]) for images in [-1, 1]; `generators`: one
    torch.Generator per image, on the latents' device. `on_record` receives every `Score`,
    `Improved` and `Guarded` record; `on_intermediate(b, stage, i, j, image)` the intermediate
    images (`settings.save_intermediates`: x̂0 before forward guidance, "estimate"; after it,
    "guided"; after backward guidance, "backward"). `state`, `on_checkpoint`, `checkpoint_every`,
    `should_stop`: see the module docstring. `precision`: "fp32" (the reference's numbers),
    "bf16" or "fp16" (ldm/models/diffusion/mixed_precision.py). `gradient_decoder`: a cheap
    decoder of latents to images in [-1, 1] (ldm/models/taesd.py) that carries the guidance
    gradient instead of the first stage's; the scores of the estimates are then of its images,
    while the full decoder renders every image that is kept."""
    device = model.betas.device
    if autocast_dtype(precision) is not None:
        model = MixedPrecision(model, objective, precision, device, gradient_decoder)
        objective, gradient_decoder = model.objective, gradient_decoder and model.gradient_decode
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for a batch of {shape[0]}")
    if cond is not None and cond.shape[0] != shape[0]:
        cond = cond.expand(shape[0], *cond.shape[1:])
    settings.check_for(model.num_timesteps)
    emit = on_record or (lambda record: None)
    checks = DeviceChecks()
    run = _Run(model, cond, objective, settings, generators, checks, None, emit,
               on_intermediate or (lambda b, stage, i, j, image: None), precision, gradient_decoder)
    timesteps = settings.schedule(model.num_timesteps)
    st = (_fresh_state(run, shape, device) if state is None
          else _resumed_state(state, run, timesteps, shape, device))
    run.score = Scorer(objective, st.best, emit, checks)
    _loop(run, st, timesteps, progress, on_checkpoint, checkpoint_every, should_stop)
    final_images, final_dist, final_cos = run.score.last
    for b, (d, c) in enumerate(zip(*run.score.last_host)):
        emit(Score(b, -1, None, "final", d, c))
    return GuidedResult(final_images, final_dist.detach(), final_cos.detach(), _rendered(run),
                        st.iterations, st.guard_events)


def _rendered(run: _Run) -> list[BestImage]:
    """The best images, those made by the cheap decoder rendered again by the full one."""
    with torch.no_grad():
        return [b if b.latent is None else replace(
            b, image=run.model.decode_first_stage(b.latent[None].to(run.model.betas.device))[0].float().cpu())
            for b in run.score.best]


def _loop(run: _Run, st: SamplerState, timesteps, progress, on_checkpoint, checkpoint_every,
          should_stop) -> None:
    """Every (timestep, self-recurrence) from the state's position on; the state is complete
    at each iteration boundary, where it may be saved or the loop stopped."""
    s, model = run.settings, run.model
    start = (st.k, st.j)
    bar = tqdm(total=s.total_iterations(model.num_timesteps), initial=st.iterations, unit="it",
               desc="guided sampling", disable=not progress, dynamic_ncols=True)
    try:
        for k in range(start[0], len(timesteps)):
            i = timesteps[k]
            i_prev = timesteps[k + 1] if k + 1 < len(timesteps) else -1
            t = torch.full((st.z.shape[0],), i, device=st.z.device, dtype=torch.long)
            beta = step_beta(model.betas, model.alphas_cumprod, i, i_prev)
            first = st.j if k == start[0] else 0
            if first == 0:
                st.best_prev_score, st.best_prev_z = steps.no_candidate(st.batch, st.z.device), None
                # The backward-guidance gate is evaluated once per timestep, as in the reference.
                st.do_backward = s.backward_guidance & (-st.history.mean(dim=1) < s.avg_sim_to_start_backward)
            backward_now = s.backward_guidance and bool(st.do_backward.any())
            for j in range(first, s.recurrences(timesteps, k)):
                st.k, st.j, st.timestep = k, j, i
                here = st.snapshot(run.generators)
                if (on_checkpoint is not None and checkpoint_every > 0 and st.iterations > 0
                        and st.iterations % checkpoint_every == 0 and (k, j) != start):
                    run.checks.flush()  # a checkpoint never holds a faulty latent
                    on_checkpoint(here)
                if should_stop is not None and should_stop():
                    run.checks.flush()
                    raise SamplingStopped(here)
                run.checks.where, run.score.where = (i, j, here), (i, j)
                st.iterations += 1
                _iteration(run, st, timesteps, k, t, i_prev, j, beta, backward_now)
                bar.update(1)
            if progress:
                dists = run.score.last_host[0]
                bar.set_postfix(dist=f"{sum(dists) / len(dists):.4g}",
                                best=f"{min(b.distance for b in run.score.best):.4g}", refresh=False)
        run.checks.flush()  # the last iteration's latent checks
    finally:
        bar.close()


def _iteration(run: _Run, st: SamplerState, timesteps, k, t, i_prev, j, beta, backward_now) -> None:
    """One self-recurrence j at the k-th visited timestep i: estimate (guided or not), backward
    guidance, the step to i_prev, z_prev selection and re-noising; advances `st`."""
    s, model, i, n = run.settings, run.model, timesteps[k], len(timesteps)
    # Intermediate images every `print_every` visited timesteps (every 10th timestep and the
    # first one, as in the reference, for the full schedule).
    print_now = s.save_intermediates and (n - 1 - k) % s.print_every == 0
    last = i_prev < 0 and j == s.recurrences(timesteps, k) - 1
    if s.guided_at(timesteps, k):
        eps, z0, x, dist, grad = steps.estimate_with_gradient(
            model, st.z, t, run.cond, run.score, run.precision, run.checks, decode=run.gradient_decoder,
            through_unet=s.gradient == "unet", keep_latents=run.gradient_decoder is not None)
        if j == 0 and (print_now or (s.save_intermediates and k == 0)):
            run.save_all("estimate", i, j, x if run.gradient_decoder is None else _decode(model, z0))
        st.history[:, st.history_count % s.sim_queue_size] = -dist
        st.history_count += 1
        z0 = steps.guided_estimate(model, st.z, t, eps, grad, s.forward_guidance_wt,
                                   s.grad_clip_threshold, run.checks,
                                   lambda mask: _guarded(run, st, i, j, mask))
        if not s.skip_guided_decode or last or (print_now and j == 0):
            x = _decode(model, z0)
            if print_now and j == 0:
                run.save_all("guided", i, j, x)
            run.score(x, "guided")
    elif s.forward_guidance and s.skip_guided_decode and not (last or print_now):
        z0 = steps.plain_estimate(model, st.z, t, run.cond, run.checks, decode=False)
    else:
        z0, x = steps.plain_estimate(model, st.z, t, run.cond, run.checks)
        if print_now:
            run.save_all("estimate", i, j, x)
        run.score(x, "estimate")  # the reference scores nothing here; we track the best anyway
    if backward_now:
        z0, x = steps.backward_guidance(model, run.score, z0, st.do_backward, s)
        if print_now and j == 0:
            run.save_all("backward", i, j, x)
    with torch.no_grad():
        z_prev = z0 if i_prev < 0 else (ddim_step(model, st.z, t, z0, i_prev) if s.step == "ddim"
                                        else ancestral_step(model, st.z, t, z0, beta, i, run.randn(st.z)))
        run.checks.check(z_prev, "latent")
        if s.select_prev and i_prev >= 0:
            _select_prev(run, st, z_prev, t, i, i_prev, j)
        if j != s.recurrences(timesteps, k) - 1:
            st.z = renoise(z_prev, beta, run.randn(st.z))
            run.checks.check(st.z, "latent")
        else:
            st.z = st.best_prev_z if st.best_prev_z is not None else z_prev
    # The latent checks of this iteration are resolved with the next evaluation.


def _decode(model, z0: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode_first_stage(z0)


def _guarded(run: _Run, st: SamplerState, i: int, j: int, mask: torch.Tensor) -> None:
    for b in mask.nonzero().flatten().tolist():
        st.guard_events[b] += 1
        run.emit(Guarded(b, i, j))


def _select_prev(run: _Run, st: SamplerState, z_prev, t, i, i_prev, j) -> None:
    """`--optim_select_prev`: score the z_prev candidate, keep the best per image."""
    dist, cos = steps.prev_candidate_scores(run.model, run.objective, z_prev, torch.full_like(t, i_prev),
                                            run.cond, run.checks)
    old = st.best_prev_score
    st.best_prev_score, st.best_prev_z, better = steps.keep_better_prev(dist, old, st.best_prev_z, z_prev)
    d_host, c_host, old_host, better_host = (x.tolist() for x in run.checks.flush(dist, cos, old, better))
    for b in range(len(d_host)):
        run.emit(Score(b, i, j, "z_prev", d_host[b], c_host[b]))
        if better_host[b]:
            run.emit(Improved(b, old_host[b], -d_host[b], "z_prev"))
