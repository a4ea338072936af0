"""FeatInv's training as a LightningModule (Neukirch et al. 2025, arXiv 2505.21032, sec. 3).

For an image x with feature f = F(x) (the hint), the frozen LDM's latent z0 = E(x), t ~ U{0..T-1}
and ε ~ N(0, I), the ControlNet θ minimises

    L(θ) = E ‖ε − ε_θ(√ᾱ_t z0 + √(1 − ᾱ_t) ε, t, c, f)‖²                (ε-prediction MSE)

with c the fixed prompt. With probability 0.15 per image the hint is zeroed and the prompt
emptied together, which also trains the unconditional branch of classifier-free guidance.
Only the ControlNet's parameters train (AdamW); with the record's `sd_locked` False (FeatInv's
and ControlNet's `sd_locked`) the UNet's decoder half (`output_blocks`, `out`) trains too.

Options beyond FeatInv: timesteps drawn with more weight on the noisy end (`timesteps="cubic"`,
T2I-Adapter's t = (1 − u³) T, u ~ U[0, 1): the noisy steps are where the hint decides the
image), and an exponential moving average of the trained weights (`ema_decay`), which is
what `decoder_state_dict` exports.

Validation: the held-out images' features are decoded as a user would (DDIM from fixed seeds,
FeatInv's guidance, the exported weights: the EMA if kept), and the samples' features compared
with the images' by cosine (`val/cosine`); rank 0 writes its originals and samples as a PNG
(`val/step_N.png` in the run folder) and to TensorBoard when it logs there.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.utils import make_grid, save_image

from ldm.checkpoint import check_state_dict
from ldm.extractors.base import FeatureExtractor
from ldm.featinv.checkpoint_io import EMA, saved_prefixes
from ldm.featinv.decoder import DecoderRecord, ResumeMismatchError
from ldm.featinv.hints import feature_to_hint
from ldm.models.diffusion.controlled_ddpm import ControlLDM, trained_part
from ldm.models.diffusion.ddim import sample_ddim
from ldm.models.diffusion.trained_decoding import FeatInvDenoiser
from ldm.objectives import cosine_similarity

VAL_SEED = 100                     # FeatInv's sampling seed; held-out image k uses VAL_SEED + k
LR_SCHEDULES = ("constant", "cosine")
TIMESTEP_SCHEDULES = ("uniform", "cubic")


def draw_timesteps(n: int, num_timesteps: int, schedule: str, device) -> torch.Tensor:
    """`n` training timesteps: uniform (DDPM), or cubic (T2I-Adapter: more of them noisy)."""
    u = torch.rand(n, device=device)
    if schedule == "cubic":
        u = 1 - u ** 3
    return (u * num_timesteps).long().clamp(max=num_timesteps - 1)


class FeatInvTraining(pl.LightningModule):
    """Trains `model.control_model` (and, unlocked, the UNet's decoder half) to decode
    `extractor`'s features (the decoder `record`)."""

    def __init__(self, model: ControlLDM, extractor: FeatureExtractor, record: DecoderRecord,
                 lr: float, lr_schedule: str = "constant", hint_dropout: float = 0.15,
                 timesteps: str = "uniform", ema_decay: float | None = None,
                 warmup_steps: int = 0, seed: int = 0, val_steps: int = 20,
                 val_guidance: float = 1.75):
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {lr_schedule!r}: one of {', '.join(LR_SCHEDULES)}")
        if timesteps not in TIMESTEP_SCHEDULES:
            raise ValueError(f"timesteps {timesteps!r}: one of {', '.join(TIMESTEP_SCHEDULES)}")
        self.model, self.extractor, self.record = model, extractor, record
        # (the trained submodules as one module, its keys' prefix): built once, a plain tuple so
        # that the view is not registered (no second copy of their keys in the state_dict)
        self._trained_part = trained_part(model, record.sd_locked)
        self.lr, self.lr_schedule, self.hint_dropout = lr, lr_schedule, hint_dropout
        self.timesteps, self.warmup_steps, self.seed = timesteps, warmup_steps, seed
        self._trained().requires_grad_(True)
        self.ema = None if ema_decay is None else AveragedModel(
            self._trained(), multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        if self.ema is not None:
            self.ema.requires_grad_(False)
        prompt, empty = (None, None) if record.prompt is None else (
            model.get_learned_conditioning([record.prompt]), model.get_learned_conditioning([""]))
        self.register_buffer("prompt_context", prompt, persistent=False)
        self.register_buffer("empty_context", empty, persistent=False)
        self.val_steps, self.val_guidance = val_steps, val_guidance
        self._val_pairs: list[torch.Tensor] = []

    def setup(self, stage: str) -> None:
        """Every rank its own random numbers (timesteps, noise, hint dropout), from the seed and
        the rank: reproducible, and eight GPUs do not draw the same batch eight times."""
        pl.seed_everything(self.seed + self.global_rank, workers=True, verbose=False)

    def configure_optimizers(self):
        """AdamW at a constant rate (FeatInv), or decaying to 0 by a half cosine over the run;
        either after a linear warm-up over `warmup_steps`."""
        optimizer = torch.optim.AdamW(self._trained().parameters(), lr=self.lr)
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

    def _trained(self) -> torch.nn.Module:
        """The trained submodules as one module (see controlled_ddpm.trained_part)."""
        return self._trained_part[0]

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights to export, under their ControlLDM keys: the EMA's, if kept."""
        part, prefix = self._trained_part
        weights = (part if self.ema is None else self.ema.module).state_dict()
        return {prefix + k: v for k, v in weights.items()}

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer's step, then the EMA's: inside the step, so that the callbacks of its
        batch (last.ckpt, the decoder export) see the EMA of the weights they save."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self._trained())

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
        self.log("train/loss", loss, prog_bar=True, batch_size=len(z0))
        if "skipped" in batch:   # unreadable images left out of the batch (data.skip_unreadable)
            self.log("data/skipped", batch["skipped"].float(), on_step=False, on_epoch=True,
                     reduce_fx="sum", sync_dist=True, batch_size=len(z0))
        return loss

    @contextmanager
    def exported_weights(self):
        """The model holds the weights to export (the EMA's, if kept) inside the block."""
        if self.ema is None:
            yield
            return
        trained = self._trained()
        current = {k: v.clone() for k, v in trained.state_dict().items()}
        trained.load_state_dict(self.ema.module.state_dict())
        try:
            yield
        finally:
            trained.load_state_dict(current)

    def sample(self, hint: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Images in [-1, 1] decoded from `hint` by DDIM (FeatInv's sampling), one seed each."""
        shape = (len(hint), self.model.channels, self.model.image_size, self.model.image_size)
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        denoiser = FeatInvDenoiser(self.model, hint, self.val_guidance,
                                   self.prompt_context, self.empty_context)
        z = sample_ddim(denoiser, shape, steps=self.val_steps, guidance_scale=1.0,
                        generators=generators)
        return self.model.decode_first_stage(z).clamp(-1, 1)

    def validation_step(self, batch, batch_idx):
        target = self.extractor.encode(batch["pixels"])
        with self.exported_weights():
            images = self.sample(feature_to_hint(target),
                                 [VAL_SEED + int(k) for k in batch["index"]])
        score = cosine_similarity(self.extractor(images), target)
        self.log("val/cosine", score.mean(), prog_bar=True, sync_dist=True, batch_size=len(score))
        self._val_pairs.append(torch.cat([batch["image"], images], dim=-1).float().cpu())

    def on_validation_epoch_end(self) -> None:
        """Rank 0's held-out images and their samples, side by side: a PNG in the run folder
        and, with a TensorBoard logger, its images."""
        pairs, self._val_pairs = self._val_pairs, []
        if not pairs or not self.trainer.is_global_zero:
            return
        grid = make_grid((torch.cat(pairs) + 1) / 2, nrow=4, padding=2)
        folder = Path(self.trainer.default_root_dir) / "val"
        folder.mkdir(parents=True, exist_ok=True)
        save_image(grid, folder / f"step_{self.global_step:07d}.png")
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/samples", grid, self.global_step)

    # --- Lightning's checkpoint: what training changes, and for which decoder ----------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Only what trains (and its EMA) goes into the .ckpt: the frozen base model and the
        extractor are read from their own files again when resuming."""
        kept = saved_prefixes(self.record.sd_locked)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k.startswith(kept)}
        checkpoint["featinv_record"] = self.record.to_json()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = DecoderRecord.from_json(checkpoint["featinv_record"])   # checked by SafeCheckpointIO
        if saved.sd_locked != self.record.sd_locked:
            raise ResumeMismatchError(
                f"the checkpoint was trained with --sd_locked {str(saved.sd_locked).lower()}: "
                "resume with the same --sd_locked")
        if saved != self.record:
            raise ResumeMismatchError(
                f"the checkpoint was trained for another decoder ({saved}), not for "
                f"{self.record}: resume with the same --extractor, --spatial/--pooled, --base "
                "and --hint_hidden_channels, or train into another --out")
        has_ema = any(k.startswith(EMA) for k in checkpoint["state_dict"])
        if has_ema != (self.ema is not None):
            raise ResumeMismatchError(
                f"the checkpoint was trained {'with' if has_ema else 'without'} an EMA of the "
                "weights: resume with the same --ema_decay")
        kept = saved_prefixes(self.record.sd_locked)
        frozen = {k: v for k, v in self.state_dict().items() if not k.startswith(kept)}
        checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}
        check_state_dict(self, checkpoint["state_dict"], ignorable=(),   # shapes, NaN or inf
                         expected=f"the decoder of {self.record.extractor_spec}")
