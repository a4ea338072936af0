# GPU image with the pinned dependencies of setup.py. Build from the repository root:
#   docker build -t fsd . && docker run --gpus all -v $PWD/models:/app/models fsd \
#       python scripts/resnet50_guided.py --prompt data/examples/chelsea.jpg --optim_forward_guidance ...
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        software-properties-common git make \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY setup.py pyproject.toml ./
COPY ldm ldm
RUN python3.11 -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install -e ".[test]" && touch /opt/venv/.installed
ENV PATH=/opt/venv/bin:$PATH
COPY . .
CMD ["make", "test", "VENV=/opt/venv"]
