"""Decode a torchvision ViT-H/14 (IMAGENET1K_SWAG_E2E_V1 at 518, 1280-d class token) feature.

    python scripts/vith14_guided.py --prompt data/bansal/og_img_0.png --optim_forward_guidance \
        --optim_forward_guidance_wt 4 --optim_num_steps 1000 8 --optim_early_emp_end 995 \
        --optim_grad_clip_threshold 2.0 --optim_folder outputs/og_img_0_vith14
"""
import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main("torchvision:vit_h_14", presets={"paper": {"optim_grad_clip_threshold": 2.0}}))
