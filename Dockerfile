# GPU image with the exact versions of constraints.txt. Build from the repository root:
#   docker build -t fsd . && docker run --gpus all -v $PWD/models:/app/models fsd \
#       python scripts/resnet50_guided.py --prompt data/examples/chelsea.jpg --optim_forward_guidance ...
# The base is CUDA 13.2 because the pinned torch wheel (2.15.0, PyPI's build) is built for CUDA
# 13.2 (constraints.txt: nvidia-cuda-runtime 13.2.*); the "base" flavour holds no CUDA libraries
# (the wheels bring their own), only the driver requirement (cuda>=13.2) for the container
# toolkit. CI does not run `docker build`: its machines have no Docker engine, and the image is
# over 6 GB of wheels; tests/test_packaging.py checks the base, the pins and the context instead.
FROM nvidia/cuda:13.2.0-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv make \
    && apt-get purge -y --auto-remove software-properties-common \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The dependencies first, so that their layer is reused while only the code changes.
COPY setup.py pyproject.toml constraints.txt ./
RUN python3.11 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ".[test]"
ENV PATH=/opt/venv/bin:$PATH
COPY . .
RUN pip install --no-cache-dir --no-deps -e . && touch /opt/venv/.installed
CMD ["make", "test", "VENV=/opt/venv"]
