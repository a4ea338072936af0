"""FeatInv's training as a LightningModule (Neukirch et al. 2025, arXiv 2505.21032, sec. 3).

For an image x with feature f = F(x) (the hint), the frozen LDM's latent z0 = E(x), t ~ U{0..T-1}
and ε ~ N(0, I), the ControlNet θ minimises

    L(θ) = E ‖ε − ε_θ(√ᾱ_t z0 + √(1 − ᾱ_t) ε, t, c, f)‖²                (ε-prediction MSE)

with c the fixed prompt. With probability 0.15 per image the hint is zeroed and the prompt
emptied together, which also trains the unconditional branch of classifier-free guidance.
Only the ControlNet's parameters train (AdamW).

Options beyond FeatInv: timesteps drawn with more weight on the noisy end (`timesteps="cubic"`,
T2I-Adapter's t = (1 − u³) T, u ~ U[0, 1): the noisy steps are where the hint decides the
image), and an exponential moving average of the ControlNet's weights (`ema_decay`), which is
what `decoder_state_dict` exports.

Validation: for a few fixed held-out images, the one-step estimate ẑ0 = x0(z_t, ε_θ) from fixed
noise at a few fixed timesteps is decoded, and its feature compared with the image's by cosine.
"""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ldm.extractors.base import FeatureExtractor
from ldm.featinv.decoder import DecoderRecord, ResumeMismatchError
from ldm.featinv.hints import feature_to_hint
from ldm.models.diffusion.controlled_ddpm import CONTROL_PREFIX, ControlLDM
from ldm.objectives import cosine_similarity

TRAINED = "model.control_model."   # the trained parameters' keys in this module's state_dict
VAL_TIMESTEP_FRACTIONS = (0.25, 0.5, 0.75)
LR_SCHEDULES = ("constant", "cosine")
TIMESTEP_SCHEDULES = ("uniform", "cubic")
EMA = "ema."                        # the EMA's keys in this module's state_dict


def draw_timesteps(n: int, num_timesteps: int, schedule: str, device) -> torch.Tensor:
    """`n` training timesteps: uniform (DDPM), or cubic (T2I-Adapter: more of them noisy)."""
    u = torch.rand(n, device=device)
    if schedule == "cubic":
        u = 1 - u ** 3
    return (u * num_timesteps).long().clamp(max=num_timesteps - 1)


def fixed_noise(shape, seed: int) -> torch.Tensor:
    """N(0, I) noise that depends on `seed` only: the same at every validation, in every process."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


class FeatInvTraining(pl.LightningModule):
    """Trains `model.control_model` to decode `extractor`'s features (the decoder `record`)."""

    def __init__(self, model: ControlLDM, extractor: FeatureExtractor, record: DecoderRecord,
                 lr: float, lr_schedule: str = "constant", hint_dropout: float = 0.15,
                 timesteps: str = "uniform", ema_decay: float | None = None,
                 warmup_steps: int = 0, seed: int = 0):
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {lr_schedule!r}: one of {', '.join(LR_SCHEDULES)}")
        if timesteps not in TIMESTEP_SCHEDULES:
            raise ValueError(f"timesteps {timesteps!r}: one of {', '.join(TIMESTEP_SCHEDULES)}")
        self.model, self.extractor, self.record = model, extractor, record
        self.lr, self.lr_schedule, self.hint_dropout = lr, lr_schedule, hint_dropout
        self.timesteps, self.warmup_steps, self.seed = timesteps, warmup_steps, seed
        model.control_model.requires_grad_(True)
        self.ema = None if ema_decay is None else AveragedModel(
            model.control_model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self._ema_step = -1
        prompt, empty = (None, None) if record.prompt is None else (
            model.get_learned_conditioning([record.prompt]), model.get_learned_conditioning([""]))
        self.register_buffer("prompt_context", prompt, persistent=False)
        self.register_buffer("empty_context", empty, persistent=False)
        T = model.num_timesteps
        self.val_timesteps = [round(f * (T - 1)) for f in VAL_TIMESTEP_FRACTIONS]

    def setup(self, stage: str) -> None:
        """Every rank its own random numbers (timesteps, noise, hint dropout), from the seed and
        the rank: reproducible, and eight GPUs do not draw the same batch eight times."""
        pl.seed_everything(self.seed + self.global_rank, workers=True, verbose=False)

    def configure_optimizers(self):
        """AdamW at a constant rate (FeatInv), or decaying to 0 by a half cosine over the run;
        either after a linear warm-up over `warmup_steps`."""
        optimizer = torch.optim.AdamW(self.model.control_model.parameters(), lr=self.lr)
        if self.lr_schedule == "constant" and not self.warmup_steps:
            return optimizer
        steps, warmup = self.trainer.estimated_stepping_batches, self.warmup_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if self.lr_schedule == "constant":
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The ControlNet's weights to export (`control_model.*`): the EMA's, if kept."""
        control = self.model.control_model if self.ema is None else self.ema.module
        return {CONTROL_PREFIX + k: v for k, v in control.state_dict().items()}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None and self.global_step > self._ema_step:   # after an optimizer step
            self.ema.update_parameters(self.model.control_model)
            self._ema_step = self.global_step

    @torch.no_grad()
    def _inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents z0 of the images, hints of their features); a cached batch (data.CachedPairs)
        holds the posterior's mean and std and the hint already."""
        if "hint" in batch:
            mean = batch["latent_mean"]
            z0 = mean + batch["latent_std"] * torch.randn_like(mean)
            return self.model.scale_factor * z0, batch["hint"]
        posterior = self.model.encode_first_stage(batch["image"])
        hint = feature_to_hint(self.extractor.encode(batch["pixels"]))
        return self.model.get_first_stage_encoding(posterior), hint

    def _context(self, keep: torch.Tensor) -> torch.Tensor | None:
        """The prompt's context where `keep`, the empty prompt's elsewhere (None: no prompt)."""
        if self.prompt_context is None:
            return None
        shape = (len(keep), *self.prompt_context.shape[1:])
        return torch.where(keep[:, None, None], self.prompt_context.expand(shape),
                           self.empty_context.expand(shape))

    def training_step(self, batch, batch_idx):
        z0, hint = self._inputs(batch)
        keep = torch.rand(len(z0), device=z0.device) >= self.hint_dropout
        hint = hint * keep[:, None, None, None].to(hint.dtype)
        t = draw_timesteps(len(z0), self.model.num_timesteps, self.timesteps, z0.device)
        noise = torch.randn_like(z0)
        z_t = self.model.q_sample(z0, t, noise)
        eps = self.model.apply_model(z_t, t, self._context(keep), hint)
        loss = F.mse_loss(eps.float(), noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        target = self.extractor.encode(batch["pixels"])
        z0 = self.model.scale_factor * self.model.encode_first_stage(batch["image"]).mode()
        noise = torch.stack([fixed_noise(z0.shape[1:], int(k)) for k in batch["index"]]).to(z0)
        context = self._context(torch.ones(len(z0), dtype=torch.bool, device=z0.device))
        scores = []
        for timestep in self.val_timesteps:
            t = torch.full((len(z0),), timestep, device=z0.device, dtype=torch.long)
            z_t = self.model.q_sample(z0, t, noise)
            eps = self.model.apply_model(z_t, t, context, feature_to_hint(target))
            x0_hat = self.model.decode_first_stage(self.model.predict_start_from_noise(z_t, t, eps))
            score = cosine_similarity(self.extractor(x0_hat.clamp(-1, 1)), target).mean()
            self.log(f"val/cosine_t{timestep}", score, sync_dist=True)
            scores.append(score)
        self.log("val/cosine", torch.stack(scores).mean(), prog_bar=True, sync_dist=True)

    # --- Lightning's checkpoint: what training changes, and for which decoder ----------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Only the ControlNet goes into the .ckpt: the frozen base model and the extractor are
        read from their own files again when resuming."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k.startswith((TRAINED, EMA))}
        checkpoint["featinv_record"] = self.record.to_json()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = DecoderRecord.from_json(checkpoint.get("featinv_record", "{}"))
        if saved != self.record:
            raise ResumeMismatchError(
                f"the checkpoint was trained for another decoder ({saved}), not for "
                f"{self.record}: resume with the same --extractor, --spatial/--pooled, --base "
                "and --hint_hidden_channels, or train into another --out")
        frozen = {k: v for k, v in self.state_dict().items() if not k.startswith((TRAINED, EMA))}
        checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}
