"""FeatInv (Neukirch et al. 2025, arXiv 2505.21032): a trained decoder of a vision model's
features, a ControlNet on a frozen latent diffusion model conditioned on the feature (the hint).

    model, record = load_decoder("decoder.safetensors", base_ckpt)        # ldm.featinv.decoder
    hint = feature_to_hint(record.build_extractor().image_features(pil))  # ldm.featinv.hints
    z = sample_ddim(model, shape, cond, uncond, hint, generators=gens)   # ldm.models.diffusion.ddim

Training: ldm.featinv.train_command (scripts/train_featinv.py); the toy world's decoders: ldm.toy_build.featinv_decoders.
"""
from ldm.featinv.decoder import (FEATINV_PROMPT, DecoderRecord, load_decoder,
                                 load_featinv_checkpoint, new_decoder, read_record, save_decoder)
from ldm.featinv.hints import feature_to_hint, hint_shape

__all__ = ["FEATINV_PROMPT", "DecoderRecord", "feature_to_hint", "hint_shape", "load_decoder",
           "load_featinv_checkpoint", "new_decoder", "read_record", "save_decoder"]
