"""Where the project's own files are (configs/, models/, data/), wherever a script runs from:
defaults name them relative to the installation, not to the current folder."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shipped(relative: str | Path) -> Path:
    """A path of the project's tree (`configs/toy/ldm.yaml`) as an absolute path."""
    return ROOT / relative


DEFAULT_CONFIG = str(shipped("configs/stable-diffusion/v1-inference.yaml"))
DEFAULT_CKPT = str(shipped("models/ldm/stable-diffusion/sd-v1-4.ckpt"))
