"""Defaults of the toy world's guided decoding (scripts/toy_guided.py, the demo, the benchmark)."""

from ldm.paths import shipped
from ldm.toy.names import TOY_NETS

TOY_CONFIG = str(shipped("configs/toy/ldm.yaml"))
TOY_CKPT = str(shipped("models/toy/ldm.safetensors"))

TOY_DEFAULTS = {
    "config": TOY_CONFIG,
    "ckpt": TOY_CKPT,
    "H": 32,
    "W": 32,
    "prompt": str(shipped("data/toy/toy_00_red_circle.png")),
    "optim_folder": "outputs/toy",
    # Measured on the toy benchmark: w = 4 (the paper's SD setting) reaches cosine 0.99+ with
    # adversarial, off-world images against these small CNNs; w = 1 with more self-recurrence
    # keeps the images in the world (docs/toy-world.md).
    "optim_forward_guidance_wt": 1.0,
    "optim_grad_clip_threshold": 3.0,
    "optim_num_steps": [8, 2],
    "optim_early_emp_end": 900,
    "optim_timesteps": 100,
    # The toy LDM is unconditional: its trained decoders are guided over the hint (ldm/toy_build/featinv_decoders.py).
    "featinv_guidance": 5.0,
    # Torch threads of every toy script: its models are too small to gain from a second thread,
    # and on a shared 2-core CPU two threads were 4-5x slower (measured: docs/toy-world.md).
    "threads": 1,
}

# The shipped trained decoders (spatial pre-pool map), the default of --featinv_decoder.
TOY_FEATINV_DECODERS = {name: str(shipped(f"models/toy/featinv_{name.removeprefix('toy_')}_spatial.safetensors"))
                        for name in TOY_NETS}

TOY_CKPT_HINT = ("toy latent diffusion weights not found at {path}: they ship with the repository "
                 "(models/toy/ldm.safetensors); rebuild them with "
                 "`python scripts/train_toy.py --only ldm`")

# The toy's changes to the presets (scripts/toy_guided.py): the toy's guidance weight (w = 4 makes
# off-world images against these small CNNs), the fast path's tiny decoder is the toy's own, and
# the schedules chosen on the toy benchmark (docs/fast-path.md, docs/trained-decoder.md).
TOY_PRESETS = {
    "fast": {"optim_forward_guidance_wt": 1.0, "gradient_decoder": None},
    "hybrid": {"optim_forward_guidance_wt": 1.0, "featinv_guidance": 3.0},
}
