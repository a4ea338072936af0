from setuptools import find_packages, setup

# The ranges the code needs, so that installing this package into an existing environment keeps
# its versions where they are in range. A lower bound is an API the code uses (named), the major
# series the code is tested with, or a floor of APIs stable for years. The exact versions of the
# reproducible setup (make's venv, environment.yaml, the Dockerfile) are in constraints.txt; CI
# installs those, not the bounds, and tests/test_packaging.py checks them against these ranges.
INSTALL_REQUIRES = [
    "torch>=2.6",               # torch.compiler.set_stance (2.6), torch.serialization.safe_globals (2.5)
    "torchvision>=0.21",        # the release built for torch 2.6
    "open_clip_torch>=3.0",     # the tested major series
    "transformers>=5.0",        # CLIPTokenizer from an in-memory vocabulary (ldm/modules/encoders/tokenizer.py)
    "huggingface_hub>=0.23",    # try_to_load_from_cache, hf_hub_download (ldm/extractors/weights.py)
    "omegaconf>=2.1",
    "PyYAML>=5.1",              # yaml.safe_load of configs (ldm/models/loading.py)
    "einops>=0.6",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "pillow>=9.1",
    "numpy>=1.24",
    "timm>=1.0",                # the tested major series
    "matplotlib>=3.5",
    "pytorch-lightning>=2.0",   # training of the trained (FeatInv) decoder: Lightning 2's Trainer API
]

setup(
    name="feature-space-decoder",
    version="0.1.0",
    description="Decode a vision model's feature back into images with feature-guided Stable Diffusion",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ldm", "ldm.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3", "diffusers>=0.30"],
                    # sample images and curves of scripts/train_featinv.py in TensorBoard
                    "tensorboard": ["tensorboard>=2.14"]},
)
