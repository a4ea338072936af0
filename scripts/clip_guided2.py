"""Decode CLIP RN50's embedding of a TEXT prompt into images (the paper's Fig. 8).

The reference README documents this script but never shipped it. --prompt is always read as
text here, even when it looks like a file name.

    python scripts/clip_guided2.py --prompt "A black motorbike parked on the dry ground" \
        --optim_forward_guidance --optim_forward_guidance_wt 4 --optim_num_steps 1000 8 \
        --optim_early_emp_end 995 --optim_grad_clip_threshold 3.0 --optim_folder outputs/txt_1
"""
import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main("open_clip:RN50", text_only=True,
                  defaults={"prompt": "A black motorbike parked on the dry ground"}))
