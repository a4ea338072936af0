"""FeatInv's training as a LightningModule (Neukirch et al. 2025, arXiv 2505.21032, sec. 3).

For an image x with feature f = F(x) (the hint), the frozen LDM's latent z0 = E(x), t ~ U{0..T-1}
and ε ~ N(0, I), the ControlNet θ minimises

    L(θ) = E ‖ε − ε_θ(√ᾱ_t z0 + √(1 − ᾱ_t) ε, t, c, f)‖²                (ε-prediction MSE)

with c the fixed prompt. With probability 0.15 per image the hint is zeroed and the prompt
emptied together, which also trains the unconditional branch of classifier-free guidance.
Only the ControlNet's parameters train (AdamW).

Validation: for a few fixed held-out images, the one-step estimate ẑ0 = x0(z_t, ε_θ) from fixed
noise at a few fixed timesteps is decoded, and its feature compared with the image's by cosine.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ldm.extractors.base import FeatureExtractor
from ldm.featinv.decoder import DecoderRecord, ResumeMismatchError
from ldm.featinv.hints import feature_to_hint
from ldm.models.diffusion.controlled_ddpm import ControlLDM
from ldm.objectives import cosine_similarity

TRAINED = "model.control_model."   # the trained parameters' keys in this module's state_dict
VAL_TIMESTEP_FRACTIONS = (0.25, 0.5, 0.75)
LR_SCHEDULES = ("constant", "cosine")


def fixed_noise(shape, seed: int) -> torch.Tensor:
    """N(0, I) noise that depends on `seed` only: the same at every validation, in every process."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


class FeatInvTraining(pl.LightningModule):
    """Trains `model.control_model` to decode `extractor`'s features (the decoder `record`)."""

    def __init__(self, model: ControlLDM, extractor: FeatureExtractor, record: DecoderRecord,
                 lr: float, lr_schedule: str = "constant", hint_dropout: float = 0.15):
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {lr_schedule!r}: one of {', '.join(LR_SCHEDULES)}")
        self.model, self.extractor, self.record = model, extractor, record
        self.lr, self.lr_schedule, self.hint_dropout = lr, lr_schedule, hint_dropout
        model.control_model.requires_grad_(True)
        prompt, empty = (None, None) if record.prompt is None else (
            model.get_learned_conditioning([record.prompt]), model.get_learned_conditioning([""]))
        self.register_buffer("prompt_context", prompt, persistent=False)
        self.register_buffer("empty_context", empty, persistent=False)
        T = model.num_timesteps
        self.val_timesteps = [round(f * (T - 1)) for f in VAL_TIMESTEP_FRACTIONS]

    def configure_optimizers(self):
        """AdamW at a constant rate (FeatInv), or decaying to 0 by a half cosine over the run."""
        optimizer = torch.optim.AdamW(self.model.control_model.parameters(), lr=self.lr)
        if self.lr_schedule == "constant":
            return optimizer
        steps = self.trainer.estimated_stepping_batches
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    @torch.no_grad()
    def _inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents z0 of the images, hints of their features)."""
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
        t = torch.randint(0, self.model.num_timesteps, (len(z0),), device=z0.device)
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
                                    if k.startswith(TRAINED)}
        checkpoint["featinv_record"] = self.record.to_json()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = DecoderRecord.from_json(checkpoint.get("featinv_record", "{}"))
        if saved != self.record:
            raise ResumeMismatchError(
                f"the checkpoint was trained for another decoder ({saved}), not for "
                f"{self.record}: resume with the same --extractor, --spatial/--pooled, --base "
                "and --hint_hidden_channels, or train into another --out")
        frozen = {k: v for k, v in self.state_dict().items() if not k.startswith(TRAINED)}
        checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}
