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

Precision: `precision="bf16"` or `"fp16"` runs the UNet, the first-stage decoder and the
objective (the extractor) under autocast; their outputs are cast back to float32, so the
latent, the distance, the gradient rescaling and clipping and the latent update stay float32.
"fp32" (the default) runs everything in float32, as the reference did. Under fp16 the loss of
each image is scaled to `FP16_LOSS_SCALE` before the backward pass, so that the gradient does
not underflow to zero in float16; the per-image rescaling to ‖ε‖ makes the scale irrelevant.
"""
from __future__ import annotations

import contextlib
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


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16_LOSS_SCALE = 2.0 ** 10   # each image's loss is scaled to this before an fp16 backward


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32: no autocast)."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; choose one of "
                         + ", ".join(PRECISIONS)) from None


def autocast(precision: str, device: torch.device | str):
    """The autocast context of `precision` on `device` (a no-op context for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        raise ValueError(f"precision {precision!r}: autocast is not available on {device_type}")
    return torch.autocast(device_type, dtype=dtype)


class _MixedPrecision:
    """The model's UNet and decoder, and the objective, under autocast with float32 outputs;
    everything else is the wrapped model's."""

    def __init__(self, model, objective: Objective, precision: str, device: torch.device):
        self._model, self._objective = model, objective
        self._precision, self._device = precision, device

    def __getattr__(self, name):
        return getattr(self._model, name)

    def apply_model(self, z_t, t, cond):
        with autocast(self._precision, self._device):
            return self._model.apply_model(z_t, t, cond).float()

    def decode_first_stage(self, z):
        with autocast(self._precision, self._device):
            return self._model.decode_first_stage(z).float()

    def objective(self, images):
        with autocast(self._precision, self._device):
            dist, cos = self._objective(images)
        return dist.float(), cos.float()


def _guidance_loss(dist: torch.Tensor, precision: str) -> torch.Tensor:
    """The scalar whose gradient guides: −Σ dist. Under fp16 each image's term is scaled to
    FP16_LOSS_SCALE (a per-image constant, which the rescaling to ‖ε‖ cancels)."""
    if precision != "fp16":
        return -dist.sum()
    scale = FP16_LOSS_SCALE / dist.detach().abs().clamp_min(torch.finfo(torch.float32).tiny)
    return -(dist * scale).sum()


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


class _DeviceChecks:
    """The inner loop's finiteness checks (and host reads such as the guard mask), gathered on
    the device and resolved together at the next host transfer, which logging needs anyway:
    one device-host sync per evaluation instead of one per check. Each check remembers where
    it was made (timestep, recurrence, the state at the start of that iteration), so a fault
    reports the place an immediate check would have; checks are resolved in the order made."""

    def __init__(self):
        self.pending: list[tuple] = []   # (stage or callback, where, tensor)
        self.where: tuple | None = None  # (timestep, recurrence, state) of the current iteration

    def check(self, x: torch.Tensor, stage: str) -> None:
        """A NaN or inf in any image of x (first dimension: batch) is a fault of `stage`."""
        self.pending.append((stage, self.where, torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)))

    def on_host(self, callback: Callable[[torch.Tensor], None], x: torch.Tensor) -> None:
        """`callback(x on the host)` at the next flush, after the checks made before it."""
        self.pending.append((callback, None, x))

    def flush(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Resolve everything pending (NumericalFault at the first failed check) and return
        `values` on the host (float64, exact for float32), all in one transfer."""
        pending, self.pending = self.pending, []
        tensors = [x for _, _, x in pending] + list(values)
        if not tensors:
            return []
        flat = torch.cat([x.detach().reshape(-1).to(torch.float64) for x in tensors]).cpu()
        host = [part.reshape(x.shape) for part, x in
                zip(flat.split([x.numel() for x in tensors]), tensors)]
        for (what, where, _), x in zip(pending, host):
            if callable(what):
                what(x)
            elif not bool(x.all()):
                timestep, recurrence, state = where
                raise NumericalFault(what, timestep, recurrence,
                                     (x == 0).nonzero().flatten().tolist(), state)
        return host[len(pending):]


class _Scorer:
    """Scores decoded images with the objective, writes the log lines and keeps the best image
    per target (the reference's `check_image`)."""

    def __init__(self, objective: Objective, batch: int, log: LogFn | None, log_cosine: bool,
                 checks: _DeviceChecks):
        self.objective = objective
        self.best = [BestImage() for _ in range(batch)]
        self.log = log or (lambda b, line: None)
        self.log_cosine = log_cosine
        self.checks = checks
        self.last = None       # (images, distance, cosine) of the latest evaluation
        self.last_host = None  # (distances, cosines) of the latest evaluation, as lists

    def line(self, label: str, dist: float, cos: float) -> str:
        text = f"{label} -> xy_dists:{dist}"
        return text + f", xy_cossim:{cos}" if self.log_cosine else text

    def record(self, images, dist: list[float], cos: list[float], t, rec, bk=-1, backward=False):
        """Log and track the scores (host values) of already-evaluated images."""
        label = f"{t}th timestep, {_fmt_rec(rec)}th self-recurrence"
        if backward:
            label += f", {bk}th backward iteration"
        for b, (d, c) in enumerate(zip(dist, cos)):
            self.log(b, self.line(label, d, c))
            best = self.best[b]
            if -d > best.score:
                self.log(b, f"!!! Found a better image ({best.score} -> {-d})")
                self.best[b] = BestImage(-d, t, rec, bk, images[b].detach().float().cpu().clone(), c)

    def score(self, images, t, rec, bk=-1, backward=False, grad=False):
        """Evaluate the objective (with or without a graph), log and track; → (dist, cos).
        The pending checks and a non-finite distance raise `NumericalFault` before anything
        is logged or kept; this is the evaluation's one device-host sync."""
        with torch.set_grad_enabled(grad):
            dist, cos = self.objective(images)
        self.checks.check(dist.detach(), "feature distance (target model features)" + (
            ", backward guidance" if backward else ""))
        dist_host, cos_host = (x.tolist() for x in self.checks.flush(dist, cos))
        self.record(images, dist_host, cos_host, t, rec, bk, backward)
        self.last = (images.detach(), dist.detach(), cos.detach())
        self.last_host = (dist_host, cos_host)
        return dist, cos


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
    precision: str = "fp32",
) -> GuidedResult:
    """Run the guided reverse process for a batch of `shape[0]` independent targets.

    `objective(images)` → (squared distance [B], cosine [B]) for images in [-1, 1];
    `generators` holds one torch.Generator per image, on the latents' device.

    `state`: continue from this `SamplerState` (the generators' states are set from it) instead
    of starting from fresh noise; the settings must be those of the run that made it.
    `on_checkpoint(state)`: called at the iteration boundaries where the number of iterations
    done is a positive multiple of `checkpoint_every` (not after the last iteration).
    `should_stop()`: polled at every iteration boundary; True raises `SamplingStopped`.
    `precision`: "fp32" (default, the reference's numbers), "bf16" or "fp16" (autocast for the
    UNet, the decoder and the objective; see the module docstring).
    Raises `NumericalFault` on a NaN or inf (see the module docstring).
    """
    device = model.betas.device
    if autocast_dtype(precision) is not None:
        with autocast(precision, device):  # fails early where autocast is unavailable
            pass
        model = _MixedPrecision(model, objective, precision, device)
        objective = model.objective
    batch = shape[0]
    if len(generators) != batch:
        raise ValueError(f"need one generator per image: {len(generators)} for a batch of {batch}")
    if cond is not None and cond.shape[0] != batch:
        cond = cond.expand(batch, *cond.shape[1:])
    s = settings
    log_fn = log or (lambda b, line: None)
    save = on_intermediate or (lambda b, name, image: None)
    checks = _DeviceChecks()
    scorer = _Scorer(objective, batch, log, log_cosine, checks)
    T = model.num_timesteps

    def randn() -> torch.Tensor:
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generators])

    def save_all(name: str, images: torch.Tensor) -> None:
        checks.flush()  # no image is saved from a faulty iteration
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

    def count_guard(i: int, j: int, bad: torch.Tensor) -> None:
        nonlocal guard_events
        if bad.any():
            guard_events += 1
            for b in bad.nonzero().flatten().tolist():
                log_fn(b, f"{i}th timestep, {j}th self-recurrence: guidance gradient is "
                          "zero (or its norm overflows); this step is taken without guidance")

    bar = tqdm(total=len(timesteps), initial=k0, desc="guided sampling", disable=not progress,
               dynamic_ncols=True)
    try:
        for k in range(k0, len(timesteps)):
            i = timesteps[k]
            # i_prev: the next (less noisy) timestep visited; -1 after the last one.
            i_prev = timesteps[k + 1] if k + 1 < len(timesteps) else -1
            t = torch.full((batch,), i, device=device, dtype=torch.long)
            beta = _step_beta(model, i, i_prev)
            # Intermediate images every `print_every` visited timesteps (every 10th timestep and
            # the first one, as in the reference, for the full schedule).
            countdown = len(timesteps) - 1 - k
            print_now = s.save_intermediates and countdown % s.print_every == 0
            K = s.recurrences(i)
            j_start = j0 if k == k0 else 0
            if j_start == 0:
                best_prev_score = torch.full((batch,), -math.inf, device=device)
                best_prev_z = None
                # The backward-guidance gate is evaluated once per timestep, as in the reference.
                do_backward = s.backward_guidance & (-history.mean(dim=1) < s.avg_sim_to_start_backward)
            backward_now = s.backward_guidance and bool(do_backward.any())  # once per timestep
            for j in range(j_start, K):
                # Iteration boundary: the state is complete here.
                here = snapshot(k, j)
                if (on_checkpoint is not None and checkpoint_every > 0 and iterations > 0
                        and iterations % checkpoint_every == 0 and (k, j) != (k0, j0)):
                    checks.flush()  # a checkpoint never holds a faulty latent
                    on_checkpoint(here)
                if should_stop is not None and should_stop():
                    checks.flush()
                    raise SamplingStopped(here)
                checks.where = (i, j, here)
                iterations += 1
                if s.forward_guidance:
                    z_in = z.detach().requires_grad_(True)
                    with torch.enable_grad():
                        eps = model.apply_model(z_in, t, cond)
                        checks.check(eps.detach(), "noise prediction (UNet output)")
                        x = model.decode_first_stage(model.predict_start_from_noise(z_in, t, eps))
                        if j == 0 and (print_now or (s.save_intermediates and k == 0)):
                            save_all(f"original_guidance_{i}_{j}.png", x.detach())
                        dist, _ = scorer.score(x, i, j, grad=True)
                        (grad,) = torch.autograd.grad(_guidance_loss(dist, precision), z_in)
                    history[:, history_count % s.sim_queue_size] = -dist.detach()
                    history_count += 1
                    eps = eps.detach()
                    # Any NaN or inf in the gradient is a fault; an all-zero gradient (a flat
                    # objective) is guarded: this step is taken without guidance.
                    checks.check(grad, "guidance gradient")
                    grad, bad = rescale_to_noise_norm(grad, eps)
                    checks.on_host(lambda bad, i=i, j=j: count_guard(i, j, bad), bad)
                    grad = clip_to_std(grad, s.grad_clip_threshold)
                    with torch.no_grad():
                        z0 = model.predict_start_from_noise(z, t, eps - s.forward_guidance_wt * grad)
                        checks.check(z0, "guided latent estimate z0")
                        x = model.decode_first_stage(z0)
                    if print_now and j == 0:
                        save_all(f"guidance_3_{i}_{j}.png", x)
                    scorer.score(x, i, j + 0.5)
                else:
                    with torch.no_grad():
                        eps = model.apply_model(z, t, cond)
                        checks.check(eps, "noise prediction (UNet output)")
                        z0 = model.predict_start_from_noise(z, t, eps)
                        x = model.decode_first_stage(z0)
                    if print_now:
                        save_all(f"original_guidance_{i}_{j}.png", x)
                    scorer.score(x, i, j)  # the reference scores nothing here; we track the best anyway

                if backward_now:
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
                    checks.check(z_prev, "latent")
                    if s.select_prev and i_prev >= 0:
                        best_prev_score, best_prev_z = _select_prev(
                            model, objective, scorer, checks, z_prev, t, i, i_prev, j, cond,
                            best_prev_score, best_prev_z, log_fn)
                    if j != K - 1:
                        z = (1 - beta).sqrt() * z_prev + beta.sqrt() * randn()
                        checks.check(z, "latent")
                    else:
                        z = best_prev_z if best_prev_z is not None else z_prev
                # The latent checks of this iteration are resolved with the next evaluation.
            bar.update(1)
            if progress:
                dists = scorer.last_host[0]
                bar.set_postfix(dist=f"{sum(dists) / len(dists):.4g}",
                                best=f"{min(b.distance for b in scorer.best):.4g}", refresh=False)
        checks.flush()  # the last iteration's latent checks
    finally:
        bar.close()

    # The last evaluation scored D(ẑ0) of the final iteration (i = 0, j = K−1), which is the
    # output: the reference decodes and scores it a second time, with the same result.
    final_images, final_dist, final_cos = scorer.last
    for b, (d, c) in enumerate(zip(*scorer.last_host)):
        log_fn(b, scorer.line("-1th timestep (FINAL)", d, c))
    return GuidedResult(final_images, final_dist.detach(), final_cos.detach(), scorer.best,
                        iterations, guard_events)


def _select_prev(model, objective, scorer, checks, z_prev, t, i, i_prev, j, cond,
                 best_prev_score, best_prev_z, log_fn):
    """Score the z_prev candidate (decode its x̂0 at i_prev) and keep the best per image
    (`--optim_select_prev`). → (best_prev_score, best_prev_z)."""
    t_prev = torch.full_like(t, i_prev)
    x_prev = model.decode_first_stage(model.predict_start_from_noise(
        z_prev, t_prev, model.apply_model(z_prev, t_prev, cond)))
    dist_prev, cos_prev = objective(x_prev)
    checks.check(dist_prev, "feature distance (target model features) of the z_prev candidate")
    better = -dist_prev > best_prev_score
    d_host, c_host, old_host, better_host = (
        x.tolist() for x in checks.flush(dist_prev, cos_prev, best_prev_score, better))
    for b in range(len(d_host)):
        label = f"{i}th timestep, {j}th self-recurrence (z_prev)"
        log_fn(b, scorer.line(label, d_host[b], c_host[b]))
        if better_host[b]:
            log_fn(b, f"!!! Found a better z_prev ({old_host[b]} -> {-d_host[b]})")
    best_prev_score = torch.where(better, -dist_prev, best_prev_score)
    best_prev_z = z_prev if best_prev_z is None else torch.where(_per_image(better), z_prev, best_prev_z)
    return best_prev_score, best_prev_z


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
