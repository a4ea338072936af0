"""Names the command line offers, in a module without torch, so that `--help` and
`python -m ldm flags` answer without loading the model stack."""

LOSSES = ("squared", "cosine")
PRECISION_NAMES = ("fp32", "bf16", "fp16")   # ldm/models/diffusion/mixed_precision.py's dtypes
# The fast path's guidance gradient and step (ldm/models/diffusion/feature_guidance.py); the first is the reference's.
GRADIENTS = ("unet", "z0")
SAMPLER_STEPS = ("ancestral", "ddim")

# The paper models' short names from before the registry (ldm/extractors/registry.py) and the
# specs they stand for; the toy's are registered by the toy layer (ldm/toy/extractors.py).
PAPER_ALIASES = {"resnet50": "torchvision:resnet50", "vit_h_14": "torchvision:vit_h_14",
                 "clip_rn50": "open_clip:RN50"}
