"""Defaults of the toy world's guided decoding (scripts/toy_guided.py, the demo, the benchmark)."""

TOY_CONFIG = "configs/toy/ldm.yaml"
TOY_CKPT = "models/toy/ldm.safetensors"

TOY_DEFAULTS = {
    "config": TOY_CONFIG,
    "ckpt": TOY_CKPT,
    "H": 32,
    "W": 32,
    "prompt": "data/toy/toy_00_red_circle.png",
    "optim_folder": "outputs/toy",
    # Measured on the toy benchmark: w = 4 (the paper's SD setting) reaches cosine 0.99+ with
    # adversarial, off-world images against these small CNNs; w = 1 with more self-recurrence
    # keeps the images in the world (see README, "The toy world").
    "optim_forward_guidance_wt": 1.0,
    "optim_grad_clip_threshold": 3.0,
    "optim_num_steps": [8, 2],
    "optim_early_emp_end": 900,
    "optim_timesteps": 100,
}

TOY_CKPT_HINT = ("toy latent diffusion weights not found at {path}: they ship with the repository "
                 "(models/toy/ldm.safetensors); rebuild them with "
                 "`python scripts/train_toy.py --only ldm`")
