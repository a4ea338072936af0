"""Every file a run folder holds, by name (the reference's names for the images and the log)."""
from __future__ import annotations

from ldm.models.diffusion.sampler_state import BestImage
from ldm.scorelog import format_rec

LOG = "log.txt"
METRICS = "metrics.json"
FINAL = "out_img.png"
STATE = "resume_state.safetensors"
FEATURES = "target_features.safetensors"
INDEX = "index.json"          # in the --optim_folder of a run with several targets
LOCK = ".lock"                # held by the process writing the folder
SET_ASIDE = ".overwritten"    # a finished run's outputs while --overwrite replaces them
SET_ASIDE_DONE = ".moved"     # in SET_ASIDE: every output was moved (the new run may have written)

BEST_PATTERN = "out_img_best_t_*.png"
INTERMEDIATE_PATTERNS = ("original_guidance_*_*.png", "guidance_3_*_*.png", "guidance_2_*_b.png")
# What a run writes; what --overwrite replaces.
OUTPUT_PATTERNS = (LOG, METRICS, FINAL, BEST_PATTERN, STATE, FEATURES, *INTERMEDIATE_PATTERNS)


def best_image(best: BestImage) -> str:
    """out_img_best_t_<t>_rec_<rec>_bk_<bk>_sim_<−distance>.png, as the reference names it."""
    record = best.to_json()
    return (f"out_img_best_t_{record['t']}_rec_{format_rec(record['rec'])}_bk_{record['bk']}"
            f"_sim_{best.score:.6f}.png")


def intermediate(stage: str, i: int, j: int) -> str:
    """The reference's names of intermediate images (--optim_print): x̂0 before forward
    guidance, after it, and after backward guidance."""
    return {"estimate": f"original_guidance_{i}_{j}.png", "guided": f"guidance_3_{i}_{j}.png",
            "backward": f"guidance_2_{i}_b.png"}[stage]
