"""Feature-guided DDPM sampling ("forward guidance" with self-recurrence), after Shirahama et al.,
"Feature Space Analysis by Guided Diffusion Model" (2025), itself derived from Bansal et al.,
"Universal Guidance for Diffusion Models" (2023).

The sampler takes any latent diffusion model (`apply_model`, `predict_start_from_noise`,
`predict_noise_from_start`, `decode_first_stage`, `betas`, `alphas_cumprod`) and any objective
that maps decoded images in [-1, 1] to a squared feature distance per image. It knows nothing
about CLIP, ResNet or files: log lines and intermediate images go to callbacks.

Per timestep i (999 → 0) it runs K self-recurrences (K = num_steps[0] for i >= early_emp_end,
else num_steps[-1]). One recurrence with forward guidance:

    ε = UNet(z_i);  ẑ0 = x0(z_i, ε);  s = −‖f(D(ẑ0)) − f_s‖²
    g = ∂s/∂z_i · ‖ε‖/‖∂s/∂z_i‖, clipped to mean ± thr·std        (per image)
    ε' = ε − w·g;  ẑ0' = x0(z_i, ε')
    z_{i−1} = ancestral DDPM step from (z_i, ẑ0') with variance β_i
    z_i ← √(1−β_i) z_{i−1} + √β_i n     (re-noise, unless it is the last recurrence)

Batches hold independent targets: every statistic (norms, clipping, best image, moving average)
is per image, and each image draws its noise from its own generator, so an image's result does
not depend on its batch mates.

Interruption and resumption: at every iteration boundary the loop's whole state (latent,
position (k, j), moving-average history, best records, z_prev candidates, generator states)
is a `SamplerState`. `on_checkpoint(state)` receives it every `checkpoint_every` iterations;
`should_stop()` is polled at each boundary and makes the sampler raise `SamplingStopped`
carrying the state; `state=` starts from one. Resuming from a state gives bit for bit the
results of an uninterrupted run (same device, same thread count). How a state is stored is the
caller's business (ldm/run_state.py for the command line).

Numerical faults: a NaN or inf in the UNet's noise prediction, a feature distance, the guidance
gradient or the latent raises `NumericalFault`, which names the timestep and the stage and
carries the state at the start of the faulty iteration. An all-zero guidance gradient is not a
fault: that step is taken without guidance and logged (see `rescale_to_noise_norm`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
LogFn = Callable[[int, str], None]
ImageFn = Callable[[int, str, torch.Tensor], None]


@dataclass
class GuidanceSettings:
    """The sampler's settings; names follow the reference's `--optim_*` flags."""

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

    def __post_init__(self):
        self.num_steps = tuple(int(k) for k in self.num_steps)
        if not self.num_steps or min(self.num_steps) < 1:
            raise ValueError(f"--optim_num_steps needs one or more positive integers, got {list(self.num_steps)}")
        if self.sim_queue_size < 1:
            raise ValueError("--optim_sim_queue_size must be at least 1")
        if self.max_iters < 1:
            raise ValueError("--optim_max_iters must be at least 1")
        if self.timesteps is not None and self.timesteps < 1:
            raise ValueError(f"--optim_timesteps must be at least 1, got {self.timesteps}")

    def recurrences(self, i: int) -> int:
        """K at timestep i: the first value of num_steps early (i >= early_emp_end), else the last."""
        return self.num_steps[0] if i >= self.early_emp_end else self.num_steps[-1]

    def schedule(self, num_timesteps: int) -> list[int]:
        """The timesteps visited, noisiest first: all of them, or `timesteps` of them evenly
        spaced from num_timesteps - 1 down to 0."""
        n = num_timesteps if self.timesteps is None else min(self.timesteps, num_timesteps)
        if n == num_timesteps:
            return list(range(num_timesteps - 1, -1, -1))
        if n == 1:
            return [num_timesteps - 1]
        return sorted({round(k * (num_timesteps - 1) / (n - 1)) for k in range(n)}, reverse=True)

    def total_iterations(self, num_timesteps: int) -> int:
        return sum(self.recurrences(i) for i in self.schedule(num_timesteps))


@dataclass
class BestImage:
    """The best-scoring x̂0 estimate of one target (highest −distance)."""

    score: float = -math.inf
    t: int = -1
    rec: float = -1
    bk: int = -1
    image: torch.Tensor | None = None   # [3, H, W] in [-1, 1], detached, on the CPU
    cosine: float = float("nan")

    @property
    def distance(self) -> float:
        return -self.score

    def filename(self) -> str:
        return f"out_img_best_t_{self.t}_rec_{_fmt_rec(self.rec)}_bk_{self.bk}_sim_{self.score:.6f}.png"


@dataclass
class GuidedResult:
    final_images: torch.Tensor          # [B, 3, H, W] in about [-1, 1]: D(ẑ0') of the last iteration
    final_distance: torch.Tensor        # [B]
    final_cosine: torch.Tensor          # [B]
    best: list[BestImage]
    iterations: int
    guard_events: int = 0               # iterations whose guidance gradient was zero or non-finite
    stats: dict = field(default_factory=dict)


@dataclass
class SamplerState:
    """Everything the sampler needs to continue at an iteration boundary: the next iteration is
    self-recurrence `j` of the `k`-th visited timestep (`timestep`). Tensors live on the
    sampler's device (the generator states on the CPU, as `torch.Generator.get_state` gives
    them); `best` images on the CPU. A state is a snapshot: nothing in it is changed later."""

    k: int
    j: int
    timestep: int
    z: torch.Tensor                      # [B, C, h, w] latent entering iteration (k, j)
    history: torch.Tensor                # [B, Q] moving-average ring buffer (−distance)
    history_count: int
    best: list[BestImage]
    best_prev_score: torch.Tensor        # [B] best z_prev candidate score of this timestep
    best_prev_z: torch.Tensor | None     # its latent (select_prev only; None before any)
    do_backward: torch.Tensor            # [B] bool, the backward gate of this timestep
    iterations: int                      # iterations done
    guard_events: int
    generator_states: list[torch.Tensor]


class SamplingStopped(Exception):
    """`should_stop()` returned True: the loop stopped at an iteration boundary; `state` is
    where to resume from."""

    def __init__(self, state: SamplerState):
        super().__init__(f"sampling stopped before timestep {state.timestep}, self-recurrence "
                         f"{state.j} ({state.iterations} iterations done)")
        self.state = state


class NumericalFault(ArithmeticError):
    """A NaN or inf appeared. `timestep`, `recurrence` and `stage` say where; `images` which
    batch entries; `state` is the state at the start of the faulty iteration (its `best` holds
    the best images found before it)."""

    def __init__(self, stage: str, timestep: int, recurrence: int, images: list[int],
                 state: SamplerState):
        which = "" if state.z.shape[0] == 1 else f" (batch entries {images})"
        super().__init__(f"non-finite values (NaN or inf) in the {stage} at timestep {timestep}, "
                         f"self-recurrence {recurrence}{which}")
        self.stage, self.timestep, self.recurrence, self.images = stage, timestep, recurrence, images
        self.state = state


def _fmt_rec(rec: float) -> str:
    return str(int(rec)) if float(rec).is_integer() else str(rec)


def _per_image(x: torch.Tensor) -> torch.Tensor:
    """Reshape per-image scalars [B] to broadcast over latents [B, C, H, W]."""
    return x.reshape(-1, *([1] * 3))


def rescale_to_noise_norm(grad: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad · ‖eps‖/‖grad‖ per image (Frobenius norms). Images whose gradient is zero or not
    finite get a zero gradient instead of NaN; the returned mask marks them."""
    grad_norm = grad.flatten(1).norm(dim=1)
    eps_norm = eps.flatten(1).norm(dim=1)
    bad = ~torch.isfinite(grad_norm) | (grad_norm == 0)
    scale = torch.where(bad, torch.zeros_like(grad_norm), eps_norm / torch.where(bad, 1.0, grad_norm))
    grad = torch.where(_per_image(bad), torch.zeros_like(grad), grad)
    return grad * _per_image(scale), bad


def clip_to_std(grad: torch.Tensor, threshold: float) -> torch.Tensor:
    """Clamp each element to mean ± threshold·std of its image's gradient (unbiased std)."""
    if threshold <= 0:
        return grad
    flat = grad.flatten(1)
    mean, std = flat.mean(dim=1), flat.std(dim=1)
    low, high = _per_image(mean - threshold * std), _per_image(mean + threshold * std)
    return torch.minimum(torch.maximum(grad, low), high)


class _Scorer:
    """Scores decoded images with the objective, writes the log lines and keeps the best image
    per target (the reference's `check_image`)."""

    def __init__(self, objective: Objective, batch: int, log: LogFn | None, log_cosine: bool):
        self.objective = objective
        self.best = [BestImage() for _ in range(batch)]
        self.log = log or (lambda b, line: None)
        self.log_cosine = log_cosine
        self.last = None  # (images, distance, cosine) of the latest evaluation

    def line(self, label: str, dist: float, cos: float) -> str:
        text = f"{label} -> xy_dists:{dist}"
        return text + f", xy_cossim:{cos}" if self.log_cosine else text

    def record(self, images, dist, cos, t, rec, bk=-1, backward=False):
        """Log and track the scores of already-evaluated images."""
        label = f"{t}th timestep, {_fmt_rec(rec)}th self-recurrence"
        if backward:
            label += f", {bk}th backward iteration"
        for b, (d, c) in enumerate(zip(dist.tolist(), cos.tolist())):
            self.log(b, self.line(label, d, c))
            best = self.best[b]
            if -d > best.score:
                self.log(b, f"!!! Found a better image ({best.score} -> {-d})")
                self.best[b] = BestImage(-d, t, rec, bk, images[b].detach().float().cpu().clone(), c)

    def score(self, images, t, rec, bk=-1, backward=False, grad=False):
        """Evaluate the objective (with or without a graph), log and track; → (dist, cos).
        A non-finite distance raises `_NonFinite` before anything is logged or kept."""
        with torch.set_grad_enabled(grad):
            dist, cos = self.objective(images)
        _check_finite(dist.detach(), "feature distance (target model features)" + (
            ", backward guidance" if backward else ""))
        self.record(images, dist.detach(), cos, t, rec, bk, backward)
        self.last = (images.detach(), dist.detach(), cos)
        return dist, cos


class _NonFinite(Exception):
    def __init__(self, stage: str, images: list[int]):
        super().__init__(stage)
        self.stage, self.images = stage, images


def _check_finite(x: torch.Tensor, stage: str) -> None:
    """Raise `_NonFinite(stage, [bad batch entries])` if x holds a NaN or inf."""
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        raise _NonFinite(stage, (~finite).nonzero().flatten().tolist())


def sample_feature_guided(
    model,
    cond: torch.Tensor | None,
    objective: Objective,
    settings: GuidanceSettings,
    shape: tuple[int, int, int, int],
    generators: list[torch.Generator],
    *,
    log: LogFn | None = None,
    on_intermediate: ImageFn | None = None,
    log_cosine: bool = False,
    progress: bool = True,
    state: SamplerState | None = None,
    on_checkpoint: Callable[[SamplerState], None] | None = None,
    checkpoint_every: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> GuidedResult:
    """Run the guided reverse process for a batch of `shape[0]` independent targets.

    `objective(images)` → (squared distance [B], cosine [B]) for images in [-1, 1];
    `generators` holds one torch.Generator per image, on the latents' device.

    `state`: continue from this `SamplerState` (the generators' states are set from it) instead
    of starting from fresh noise; the settings must be those of the run that made it.
    `on_checkpoint(state)`: called at the iteration boundaries where the number of iterations
    done is a positive multiple of `checkpoint_every` (not after the last iteration).
    `should_stop()`: polled at every iteration boundary; True raises `SamplingStopped`.
    Raises `NumericalFault` on a NaN or inf (see the module docstring).
    """
    device = model.betas.device
    batch = shape[0]
    if len(generators) != batch:
        raise ValueError(f"need one generator per image: {len(generators)} for a batch of {batch}")
    if cond is not None and cond.shape[0] != batch:
        cond = cond.expand(batch, *cond.shape[1:])
    s = settings
    log_fn = log or (lambda b, line: None)
    save = on_intermediate or (lambda b, name, image: None)
    scorer = _Scorer(objective, batch, log, log_cosine)
    T = model.num_timesteps

    def randn() -> torch.Tensor:
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generators])

    def save_all(name: str, images: torch.Tensor) -> None:
        for b in range(batch):
            save(b, name, images[b])

    timesteps = s.schedule(T)
    if state is None:
        z = randn()
        history = torch.full((batch, s.sim_queue_size), -100.0, device=device)  # similarities (−dist)
        history_count = 0
        iterations = guard_events = 0
        k0 = j0 = 0
        best_prev_score = best_prev_z = do_backward = None
    else:
        _check_state(state, s, timesteps, shape)
        for g, g_state in zip(generators, state.generator_states):
            g.set_state(g_state.clone())
        z = state.z.to(device).clone()
        history = state.history.to(device).clone()
        history_count, iterations, guard_events = state.history_count, state.iterations, state.guard_events
        scorer.best = list(state.best)
        k0, j0 = state.k, state.j
        best_prev_score = state.best_prev_score.to(device)
        best_prev_z = None if state.best_prev_z is None else state.best_prev_z.to(device)
        do_backward = state.do_backward.to(device)

    def snapshot(k: int, j: int) -> SamplerState:
        return SamplerState(k, j, timesteps[k], z.detach().clone(), history.clone(), history_count,
                            list(scorer.best), best_prev_score.clone(),
                            None if best_prev_z is None else best_prev_z.clone(),
                            do_backward.clone(), iterations, guard_events,
                            [g.get_state() for g in generators])

    bar = tqdm(total=len(timesteps), initial=k0, desc="guided sampling", disable=not progress,
               dynamic_ncols=True)
    for k in range(k0, len(timesteps)):
        i = timesteps[k]
        # i_prev: the next (less noisy) timestep visited; -1 after the last one.
        i_prev = timesteps[k + 1] if k + 1 < len(timesteps) else -1
        t = torch.full((batch,), i, device=device, dtype=torch.long)
        beta = _step_beta(model, i, i_prev)
        # Intermediate images every `print_every` visited timesteps (every 10th timestep and the
        # first one, as in the reference, for the full schedule).
        countdown = len(timesteps) - 1 - k
        print_now = s.save_intermediates and countdown % s.print_every == 0
        K = s.recurrences(i)
        j_start = j0 if k == k0 else 0
        if j_start == 0:
            best_prev_score = torch.full((batch,), -math.inf, device=device)
            best_prev_z = None
            # The backward-guidance gate is evaluated once per timestep, as in the reference.
            do_backward = s.backward_guidance & (-history.mean(dim=1) < s.avg_sim_to_start_backward)
        for j in range(j_start, K):
            # Iteration boundary: the state is complete here.
            here = snapshot(k, j)
            if (on_checkpoint is not None and checkpoint_every > 0 and iterations > 0
                    and iterations % checkpoint_every == 0 and (k, j) != (k0, j0)):
                on_checkpoint(here)
            if should_stop is not None and should_stop():
                bar.close()
                raise SamplingStopped(here)
            iterations += 1
            try:
                if s.forward_guidance:
                    z_in = z.detach().requires_grad_(True)
                    with torch.enable_grad():
                        eps = model.apply_model(z_in, t, cond)
                        _check_finite(eps.detach(), "noise prediction (UNet output)")
                        x = model.decode_first_stage(model.predict_start_from_noise(z_in, t, eps))
                        if j == 0 and (print_now or (s.save_intermediates and k == 0)):
                            save_all(f"original_guidance_{i}_{j}.png", x.detach())
                        dist, _ = scorer.score(x, i, j, grad=True)
                        (grad,) = torch.autograd.grad(-dist.sum(), z_in)
                    history[:, history_count % s.sim_queue_size] = -dist.detach()
                    history_count += 1
                    eps = eps.detach()
                    # Any NaN or inf in the gradient is a fault; an all-zero gradient (a flat
                    # objective) is guarded: this step is taken without guidance.
                    _check_finite(grad, "guidance gradient")
                    grad, bad = rescale_to_noise_norm(grad, eps)
                    if bad.any():
                        guard_events += 1
                        for b in bad.nonzero().flatten().tolist():
                            log_fn(b, f"{i}th timestep, {j}th self-recurrence: guidance gradient is "
                                      "zero (or its norm overflows); this step is taken without guidance")
                    grad = clip_to_std(grad, s.grad_clip_threshold)
                    with torch.no_grad():
                        z0 = model.predict_start_from_noise(z, t, eps - s.forward_guidance_wt * grad)
                        _check_finite(z0, "guided latent estimate z0")
                        x = model.decode_first_stage(z0)
                    if print_now and j == 0:
                        save_all(f"guidance_3_{i}_{j}.png", x)
                    scorer.score(x, i, j + 0.5)
                else:
                    with torch.no_grad():
                        eps = model.apply_model(z, t, cond)
                        _check_finite(eps, "noise prediction (UNet output)")
                        z0 = model.predict_start_from_noise(z, t, eps)
                        x = model.decode_first_stage(z0)
                    if print_now:
                        save_all(f"original_guidance_{i}_{j}.png", x)
                    scorer.score(x, i, j)  # the reference scores nothing here; we track the best anyway

                if do_backward.any():
                    z0, x = _backward_guidance(model, scorer, z0, do_backward, s, i, j)
                    if print_now and j == 0:
                        save_all(f"guidance_2_{i}_b.png", x)

                with torch.no_grad():
                    if i_prev >= 0:
                        eps_prev = model.predict_noise_from_start(z, t, z0)
                        z_prev = ((z - beta / (1 - model.alphas_cumprod[i]).sqrt() * eps_prev)
                                  / (1 - beta).sqrt() + beta.sqrt() * randn())
                    else:
                        z_prev = z0
                    _check_finite(z_prev, "latent")
                    if s.select_prev and i_prev >= 0:
                        t_prev = torch.full_like(t, i_prev)
                        x_prev = model.decode_first_stage(model.predict_start_from_noise(
                            z_prev, t_prev, model.apply_model(z_prev, t_prev, cond)))
                        dist_prev, cos_prev = objective(x_prev)
                        _check_finite(dist_prev, "feature distance (target model features) of the "
                                                 "z_prev candidate")
                        better = -dist_prev > best_prev_score
                        for b in range(batch):
                            label = f"{i}th timestep, {j}th self-recurrence (z_prev)"
                            log_fn(b, scorer.line(label, dist_prev[b].item(), cos_prev[b].item()))
                            if better[b]:
                                log_fn(b, f"!!! Found a better z_prev ({best_prev_score[b].item()} -> "
                                          f"{-dist_prev[b].item()})")
                        best_prev_score = torch.where(better, -dist_prev, best_prev_score)
                        best_prev_z = z_prev if best_prev_z is None else torch.where(
                            _per_image(better), z_prev, best_prev_z)
                    if j != K - 1:
                        z = (1 - beta).sqrt() * z_prev + beta.sqrt() * randn()
                        _check_finite(z, "latent")
                    else:
                        z = best_prev_z if best_prev_z is not None else z_prev
            except _NonFinite as fault:
                bar.close()
                raise NumericalFault(fault.stage, i, j, fault.images, here) from None
        bar.update(1)
        if progress:
            bar.set_postfix(dist=f"{scorer.last[1].mean().item():.4g}",
                            best=f"{min(b.distance for b in scorer.best):.4g}", refresh=False)
    bar.close()

    # The last evaluation scored D(ẑ0) of the final iteration (i = 0, j = K−1), which is the
    # output: the reference decodes and scores it a second time, with the same result.
    final_images, final_dist, final_cos = scorer.last
    for b in range(batch):
        log_fn(b, scorer.line("-1th timestep (FINAL)", final_dist[b].item(), final_cos[b].item()))
    return GuidedResult(final_images, final_dist.detach(), final_cos.detach(), scorer.best,
                        iterations, guard_events)


def _check_state(state: SamplerState, s: GuidanceSettings, timesteps: list[int], shape) -> None:
    """A state that cannot belong to this schedule and shape is refused."""
    if not 0 <= state.k < len(timesteps) or timesteps[state.k] != state.timestep:
        raise ValueError(f"resume state at schedule position {state.k} (timestep {state.timestep}) "
                         f"does not fit this schedule of {len(timesteps)} timesteps")
    if not 0 <= state.j < s.recurrences(state.timestep):
        raise ValueError(f"resume state at self-recurrence {state.j} of timestep {state.timestep}, "
                         f"which has only {s.recurrences(state.timestep)}")
    if tuple(state.z.shape) != tuple(shape) or len(state.generator_states) != shape[0]:
        raise ValueError(f"resume state for latents {tuple(state.z.shape)}, not {tuple(shape)}")
    if tuple(state.history.shape) != (shape[0], s.sim_queue_size) or len(state.best) != shape[0]:
        raise ValueError("resume state does not fit these settings (moving-average size or batch)")


def _step_beta(model, i: int, i_prev: int) -> torch.Tensor:
    """β of the step from timestep i to i_prev: the model's β_i for consecutive timesteps
    (bit-for-bit the reference), 1 − ᾱ_i/ᾱ_{i_prev} on a respaced schedule."""
    if i_prev == i - 1:
        return model.betas[i]
    abar = model.alphas_cumprod.double()
    abar_prev = abar[i_prev] if i_prev >= 0 else abar.new_tensor(1.0)
    return (1 - abar[i] / abar_prev).to(model.betas.dtype)


def _backward_guidance(model, scorer, z0, active, s: GuidanceSettings, i: int, j: int):
    """Adam on ẑ0 to lower the feature distance (the reference's "guidance_2"), only for the
    images whose moving-average gate is open. Returns the updated ẑ0 and its decoded image."""
    z0 = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z0], lr=s.lr)
    keep = _per_image(active)
    for k in range(s.max_iters):
        with torch.enable_grad():
            dist, _ = scorer.score(model.decode_first_stage(z0), i, j + 0.7, bk=k, backward=True,
                                   grad=True)
            old = z0.detach().clone()
            opt.zero_grad(set_to_none=True)
            dist.sum().backward()
        opt.step()
        with torch.no_grad():
            # Images outside the gate keep their ẑ0; below the cutoff the step is undone.
            stop = dist.detach() < s.loss_cutoff
            z0.copy_(torch.where(keep & ~_per_image(stop), z0, old))
        if bool(stop[active].all()):
            break
    z0 = z0.detach()
    with torch.no_grad():
        x = model.decode_first_stage(z0)
    scorer.score(x, i, j + 0.9, bk=s.max_iters, backward=True)
    return z0, x
