"""Decode a CLIP RN50 feature (OpenAI weights, 1024-d image embedding) into images.

--prompt is an image path, or any other text, which is then a text target (its CLIP text
embedding), as in the reference script.

    python scripts/clip_guided.py --prompt data/bansal/og_img_0.png --optim_forward_guidance \
        --optim_forward_guidance_wt 4 --optim_num_steps 1000 8 --optim_early_emp_end 995 \
        --optim_grad_clip_threshold 3.0 --optim_folder outputs/og_img_0_clip
"""
import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main("open_clip:RN50"))
