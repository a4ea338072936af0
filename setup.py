from setuptools import find_packages, setup

# Pinned to versions that install and import together on CPU-only machines (torchvision 0.29.1
# needs torch >= 2.14, so pip takes PyPI's CUDA build of torch, which runs on the CPU too; see
# docs/installation.md). environment.yaml and the Dockerfile install this package, so these pins
# are the only ones.
INSTALL_REQUIRES = [
    "torch==2.15.0",
    "torchvision==0.29.1",
    "open_clip_torch==3.3.0",
    "transformers==5.23.0",
    "omegaconf==2.4.0",
    "einops==0.8.2",
    "safetensors==0.8.0",
    "tqdm==4.70.1",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "timm==1.0.31",
    "matplotlib==3.11.2",
    "pytorch-lightning==2.6.6",   # training of the trained (FeatInv) decoder
]

setup(
    name="feature-space-decoder",
    version="0.1.0",
    description="Decode a vision model's feature back into images with feature-guided Stable Diffusion",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ldm", "ldm.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest==9.2.0", "diffusers==0.42.1"],
                    # sample images and curves of scripts/train_featinv.py in TensorBoard
                    "tensorboard": ["tensorboard==2.21.0"]},
)
