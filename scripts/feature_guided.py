"""Decode the feature of any registered model (and any layer of it) into images.

The same flags as the per-model scripts, plus --extractor library:model[@layer]:

    python scripts/feature_guided.py --extractor torchvision:resnet50@layer3 \
        --prompt data/examples/chelsea.jpg --optim_forward_guidance --optim_forward_guidance_wt 4 \
        --optim_num_steps 1000 8 --optim_early_emp_end 995 --optim_grad_clip_threshold 3.0 \
        --optim_folder outputs/chelsea_resnet50_layer3

    python scripts/feature_guided.py --extractor timm:convnext_tiny --extractor_weights fb_in1k ...
    python scripts/feature_guided.py --extractor open_clip:RN50 \
        --prompt 'image("data/examples/chelsea.jpg") + 0.5 * (text("a dog") - text("a cat"))' ...

--extractor_weights takes the library's weights tag, a local file, or "random" (timing only).
A wrong layer name lists the valid ones; `--spatial` keeps the layer's spatial map.
"""
import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(None))
