"""Decode a torchvision ResNet-50 (IMAGENET1K_V1, 2048-d pooled) feature into images.

    python scripts/resnet50_guided.py --prompt data/bansal/og_img_0.png --optim_forward_guidance \
        --optim_forward_guidance_wt 4 --optim_num_steps 1000 8 --optim_early_emp_end 995 \
        --optim_grad_clip_threshold 3.0 --optim_folder outputs/og_img_0_resnet50
"""
import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main("torchvision:resnet50"))
